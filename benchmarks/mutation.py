"""Mutation run: plant known bugs one at a time and check that the fast tests catch each.

Every mutation is a textual patch (file, exact old snippet, new snippet) plus the tests that must
fail on it. The repository is copied once into a scratch folder (beside a link to ../shared, so
the oracles resolve as in CI); each bug is applied there alone, its tests run with `CI=true`, and
the file is restored. The run first checks that every listed test passes on the unmodified copy.

    caught    the tests failed on the bug
    survived  they passed: a missing test, unless the bug is documented as out of reach here
    STALE     the old snippet is not (or not exactly once) in its file: the code moved on; update
              the list. Any STALE, error, baseline failure or undocumented survivor fails the run.

    OMP_NUM_THREADS=1 python benchmarks/mutation.py                # every mutation (over an hour on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/mutation.py --only tau-rounded v-instead-of-k
    OMP_NUM_THREADS=1 python benchmarks/mutation.py --module anyv2v_core/batch/ nodes/comfy_wan.py
    python benchmarks/mutation.py --list
    python benchmarks/mutation.py --smoke    # only checks that every snippet matches once (tests/test_benchmarks.py)

The real-ComfyUI mutations (a real server; for the saved-workflow one also its frontend in Chromium) run
where COMFYUI_PYTHON is set (with COMFYUI_DIR, as `.ci/run` sets them); elsewhere they are listed as not run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1200


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids that must fail on the bug
    out_of_reach: str = ""  # why a survivor is expected (the owner of the test that will catch it)


SAMPLING = "tests/test_sampling_behaviour.py::"
FRONTEND = "tests/test_frontend.py::"
HOST_TESTS = ("tests/test_comfyui_", FRONTEND)  # tests that start a real ComfyUI
ENGINE = "tests/test_engine.py::"
EDITS = "tests/test_backbone_edits.py::"
NODES = "tests/test_nodes.py::"
WAN = "tests/test_wan.py::"
PLACEMENT = "tests/test_device_placement.py::"
NATIVE = "tests/test_comfyui_native.py::"

SELECT_START = """                "start_frame": ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                                        "tooltip": "Index of the first frame to keep (0 = the first frame)."}),
"""
SELECT_EVERY = """                "every_nth": ("INT", {"default": 1, "min": 1, "max": 1000,
                                      "tooltip": "Keep one frame out of every n (1 keeps them all)."}),
"""
PROMISES = "tests/test_promises.py::"
BATCH = "tests/test_batch_promises.py::"
NATIVE_PROMISES = "tests/test_comfyui_wan_native.py::"

MUTATIONS = [
    # ------------------------------------------------------------------ the bugs of issue 13's table
    Mutation("sampler-ignores-windows", "anyv2v_core/sampling.py",
             "predict_in_windows(backbone, batch, time, rows, inversion.windows)",
             "predict_in_windows(backbone, batch, time, rows, None)",
             (SAMPLING + "test_windowed_inversion_and_sampling_run_every_step_in_windows_each_with_the_source_row",)),
    Mutation("offload-never-moves-to-device", "anyv2v_core/offload.py",
             "            else:\n                weights.load(weights.slots, self.device)",
             "            elif self.policy == \"none\":\n                weights.load(weights.slots, self.device)",
             ("tests/test_device_placement.py", "tests/test_memory.py")),
    Mutation("node-cleanup-skipped", "nodes/host.py",
             "            backbone.to(offload_device())  # no copy: the weights point back at their host copies; hooks removed",
             "            pass",
             ("tests/test_node_memory.py",)),
    Mutation("tau-rounded", "anyv2v_core/injection.py",
             "int(num_steps * settings.tau(kind))", "round(num_steps * settings.tau(kind))",
             (SAMPLING + "test_tau_windows_truncate_fractional_step_counts",)),
    Mutation("instruct-pix2pix-black-frame", "nodes/first_frame.py",
             "pixels = (image[0].clamp(0, 1) * 255)", "pixels = (image[0].clamp(0, 1) * 0)",
             (NODES + "test_first_frame_editor_edits_the_source_first_frame_like_diffusers",)),
    Mutation("v-instead-of-k", "anyv2v_core/backbones/base.py",
             'query_key: tuple[str, str] = ("to_q", "to_k")', 'query_key: tuple[str, str] = ("to_q", "to_v")',
             (SAMPLING + "test_injection_overwrites_exactly_the_convs_and_the_attention_queries_and_keys",
              ENGINE + "test_each_kind_is_injected_exactly_in_its_window")),
    Mutation("backbone-device-set-alone", "anyv2v_core/backbones/base.py",
             "        raise AttributeError(f\"{self.name}'s device is set",
             "        self.initial_device = torch.device(device)  # accepted: a second holder\n        str(f\"{self.name}'s device is set",
             (PLACEMENT + "test_a_backbones_device_is_its_offloaders_and_moves_only_with_its_policy[i2vgen-xl]",)),
    Mutation("negative-row-keeps-image-embedding", "anyv2v_core/backbones/i2vgen_xl.py",
             "        if unconditional:  # the negative row's image embedding is zero", "        if False:  # the negative row's image embedding is zero",
             (SAMPLING + "test_the_negative_row_has_no_image_embedding",)),
    Mutation("inversion-evaluates-current-timestep", "anyv2v_core/diffusion_schedule.py",
             "model_output = evaluate(latents, t, t_now)", "model_output = evaluate(latents, t_now, t_now)",
             (SAMPLING + "test_inversion_runs_the_denoiser_at_each_target_from_the_clean_latents",
              SAMPLING + "test_inversion_equals_diffusers_inverse_ddim")),
    Mutation("memory-sized-for-latent-window-frames", "anyv2v_core/plan.py",
             "min(generated, (inversion.windows.length - 1) * backbone.defaults.frame_stride + 1)",
             "min(generated, inversion.windows.length)",
             (WAN + "test_temporal_windows_count_video_frames_and_one_window_is_no_window",)),
    Mutation("start-index-ignored", "anyv2v_core/plan.py",
             "start=start_level(backbone, inversion.inversion_steps, steps, start_index, inversion.order)",
             "start=start_level(backbone, inversion.inversion_steps, steps, 0, inversion.order)",
             (SAMPLING + "test_sampling_starts_from_the_inverted_latent_at_the_start_timestep",)),
    Mutation("image-embedding-keeps-float32", "anyv2v_core/backbones/i2vgen_xl.py",
             "image_embeddings = on_device([row.image_embeddings for row in rows], dtype)",
             "image_embeddings = on_device([row.image_embeddings for row in rows], torch.float32)",
             (EDITS + "test_half_precision_edit_is_finite_and_close_to_float32",)),
    Mutation("decode-chunk-drops-frames", "anyv2v_core/backbones/vae_frames.py",
             "chunk = frames_latents[start : start + chunk_size]", "chunk = frames_latents[start : start + 1]",
             (EDITS + "test_decoding_in_chunks_gives_the_frames_of_one_at_a_time",
              NODES + "test_sampler_decodes_the_same_frames_in_chunks")),
    # ------------------------------------------------------------------ injection.py
    Mutation("hook-copies-the-cond-row", "anyv2v_core/injection.py",
             "return blocks[:1].expand_as(blocks).reshape(output.shape)",
             "return blocks[-1:].expand_as(blocks).reshape(output.shape)",
             (ENGINE + "test_hook_copies_the_source_block_into_every_other_block",
              SAMPLING + "test_injection_overwrites_exactly_the_convs_and_the_attention_queries_and_keys")),
    Mutation("hooks-left-installed", "anyv2v_core/injection.py",
             "        for handle in handles:\n            handle.remove()",
             "        handles.clear()",
             (ENGINE + "test_unet_is_unpatched_after_success_and_after_an_exception", "tests/test_interrupts.py")),
    Mutation("injection-with-one-row", "anyv2v_core/injection.py",
             "self.active = active_kinds if num_rows > 1 else ()", "self.active = active_kinds",
             (ENGINE + "test_hook_copies_the_source_block_into_every_other_block",)),
    # ------------------------------------------------------------------ sampling.py
    Mutation("cfg-from-the-cond-row", "anyv2v_core/sampling.py",
             "return output_uncond + plan.cfg * (output_cond - output_uncond)",
             "return output_cond + plan.cfg * (output_cond - output_uncond)",
             (ENGINE + "test_all_taus_zero_equals_plain_i2v_sampling",)),
    Mutation("source-row-is-the-current-latent", "anyv2v_core/sampling.py",
             "batch = torch.cat([inversion.latent_at(level).to(x.device), x, x])",
             "batch = torch.cat([x, x, x])",
             (SAMPLING + "test_windowed_inversion_and_sampling_run_every_step_in_windows_each_with_the_source_row",)),
    Mutation("windows-counted-after-start-index", "anyv2v_core/sampling.py",
             "enumerate(enumerate(plan.steps, start=plan.start_index), start=1)", "enumerate(enumerate(plan.steps), start=1)",
             ("tests/test_consisti2v_pipeline.py::test_edit_latents_match_reference",)),
    # ------------------------------------------------------------------ inversion.py
    Mutation("inversion-on-the-last-frame", "anyv2v_core/inversion.py",
             "source_first_frame = plan.frames[:1]", "source_first_frame = plan.frames[-1:]",
             (SAMPLING + "test_inversion_equals_diffusers_inverse_ddim",)),
    Mutation("inversion-ignores-windows", "anyv2v_core/inversion.py",
             "return predict_in_windows(backbone, latents, time, [source_condition], plan.windows)",
             "return predict_in_windows(backbone, latents, time, [source_condition], None)",
             (SAMPLING + "test_windowed_inversion_and_sampling_run_every_step_in_windows_each_with_the_source_row",)),
    Mutation("inversion-with-a-prompt", "anyv2v_core/inversion.py",
             'backbone.condition(source_first_frame, "", num_frames', 'backbone.condition(source_first_frame, "a", num_frames',
             (SAMPLING + "test_inversion_equals_diffusers_inverse_ddim",)),
    # ------------------------------------------------------------------ schedules (schedule.py, diffusion_schedule.py)
    Mutation("ddim-noise-at-the-wrong-level", "anyv2v_core/diffusion_schedule.py",
             "return (alpha_target**0.5) * x0 + ((1 - alpha_target) ** 0.5) * eps",
             "return (alpha_target**0.5) * x0 + ((1 - alpha_x) ** 0.5) * eps",
             (ENGINE + "test_all_taus_zero_equals_plain_i2v_sampling", SAMPLING + "test_inversion_equals_diffusers_inverse_ddim")),
    Mutation("v-prediction-sign", "anyv2v_core/diffusion_schedule.py",
             "return sqrt_a * x - sqrt_1ma * model_output, sqrt_a * model_output + sqrt_1ma * x",
             "return sqrt_a * x + sqrt_1ma * model_output, sqrt_a * model_output + sqrt_1ma * x",
             (ENGINE + "test_all_taus_zero_equals_plain_i2v_sampling",)),
    Mutation("timesteps-without-offset", "anyv2v_core/diffusion_schedule.py",
             "return [k * ratio + self.steps_offset for k in reversed(range(num_steps))]",
             "return [k * ratio for k in reversed(range(num_steps))]",
             (SAMPLING + "test_sampling_starts_from_the_inverted_latent_at_the_start_timestep",)),
    Mutation("replayed-noise-ignored", "anyv2v_core/schedule.py",
             "noise = self.replay[self.drawn]", "noise = torch.randn(like.shape, generator=self.generator)",
             ("tests/test_seine_pipeline.py",)),
    # ------------------------------------------------------------------ rectified flow and Wan (flow_schedule.py, wan.py)
    Mutation("flow-shift-lost", "anyv2v_core/flow_schedule.py",
             "sigmas.append(as_float32(self.shift * s / (1 + (self.shift - 1) * s)))",
             "sigmas.append(as_float32(s))",
             (WAN + "test_flow_sigmas_are_the_uniform_grid_bent_by_the_shift_as_diffusers_shifts_it",)),
    Mutation("midpoint-becomes-euler", "anyv2v_core/flow_schedule.py",
             "        if self.order == 2:\n            halfway", "        if self.order == 3:\n            halfway",
             (WAN + "test_round_trip_error_falls_with_steps_and_second_order_wins_at_equal_calls",)),
    Mutation("experts-switched-the-wrong-way", "anyv2v_core/backbones/wan.py",
             "if self.boundary_time is None or time >= self.boundary_time:",
             "if self.boundary_time is None or time < self.boundary_time:",
             (WAN + "test_a14b_switches_experts_at_the_same_sigma_in_inversion_and_sampling",
              WAN + "test_taus_zero_is_diffusers_image_to_video_from_the_inverted_latent")),
    Mutation("ti2v-first-frame-not-clean", "anyv2v_core/backbones/wan.py",
             "        per_token[:clean_frames] = 0  # the clean first frame", "        per_token[:clean_frames] = timestep",
             (WAN + "test_taus_zero_is_diffusers_image_to_video_from_the_inverted_latent",)),
    # device slips in a Wan backbone's encode, predict and decode (issue 19): the stand-in device catches each
    Mutation("wan-encode-returns-host-latents", "anyv2v_core/backbones/wan.py",
             "        return (latents - self.latents_mean.to(latents.device)) / self.latents_std.to(latents.device)",
             "        return (latents.cpu() - self.latents_mean) / self.latents_std",
             (PLACEMENT + "test_every_phase_runs_on_the_device_with_the_cpu_frames[wan2.1-i2v-all-frames-order1-none]",)),
    Mutation("wan-predict-returns-host-velocity", "anyv2v_core/backbones/wan.py",
             "        return output.to(torch.float32)\n", "        return output.to(\"cpu\", torch.float32)\n",
             (PLACEMENT + "test_every_phase_runs_on_the_device_with_the_cpu_frames[wan2.2-i2v-a14b-all-frames-order2-model]",)),
    Mutation("wan-decode-host-normalisation", "anyv2v_core/backbones/wan.py",
             "z * self.latents_std.to(self.device) + self.latents_mean.to(self.device)",
             "z * self.latents_std + self.latents_mean",
             (PLACEMENT + "test_every_phase_runs_on_the_device_with_the_cpu_frames[wan2.2-ti2v-windows-order1-sequential]",)),
    Mutation("ti2v-clean-frame-in-every-window", "anyv2v_core/backbones/wan.py",
             "        clean_frames = 1 if bool(rows[0].follows_first_frame[0, 0, 0]) else 0",
             "        clean_frames = 1",
             (WAN + "test_ti2v_windows_put_the_clean_first_frame_in_the_first_window_only",)),
    Mutation("nan-inversion-decoded-silently", "anyv2v_core/inversion.py",
             '    check_finite(latents, "the inversion", backbone)\n', "",
             ("tests/test_precision.py::test_nan_latents_after_inversion_or_sampling_are_a_clear_error_not_a_black_video",)),
    Mutation("one-row-at-a-time-loses-the-source", "anyv2v_core/injection.py",
             "                self.events[kind] += 1\n                return self.source_outputs[module]",
             "                self.events[kind] += 1\n                return None",
             (WAN + "test_rows_one_at_a_time_give_the_batched_edit",)),
    Mutation("native-velocity-sign", "nodes/comfy_wan.py",
             "return ((x - denoised) / sigma).to(torch.float32)",
             "return ((denoised - x) / sigma).to(torch.float32)",
             ("tests/test_comfyui_wan.py::test_without_injection_the_edit_is_comfyuis_own_euler_sampler_and_follows_the_models_shift",)),
    Mutation("native-velocity-on-the-host", "nodes/comfy_wan.py",
             "return ((x - denoised) / sigma).to(torch.float32)",
             "return ((x - denoised) / sigma).to(\"cpu\", torch.float32)",
             (NATIVE + "test_native_check[wan21_i2v_runs_on_the_device_with_the_cpu_latents]",)),
    Mutation("native-phase-sized-for-one-row", "nodes/comfy_wan.py",
             "rows_at_once = 1 if self.one_row_at_a_time else rows", "rows_at_once = 1",
             (NATIVE + "test_native_check[each_phase_loads_each_expert_for_its_rows_and_predicts_between_pre_run_and_"
                       "cleanup]",)),
    Mutation("native-expert-never-cleaned-up", "nodes/comfy_wan.py",
             "            patcher.cleanup()", "            pass",
             (NATIVE + "test_native_check[each_phase_loads_each_expert_for_its_rows_and_predicts_between_pre_run_and_"
                       "cleanup]",
              NATIVE + "test_native_check[a_run_an_error_and_a_cancel_leave_no_hook_or_patch_on_the_model]")),
    Mutation("native-ti2v-clean-frame-in-every-window", "nodes/comfy_wan.py",
             "        clean_frames = 1 if bool(rows[0].follows_first_frame[0, 0, 0]) else 0\n        x = latents",
             "        clean_frames = 1\n        x = latents",
             (NATIVE + "test_native_check[wan22_ti2v_windows_put_the_clean_first_frame_in_the_first_window_only]",)),
    Mutation("auto-budget-ignores-what-comfyui-can-unload", "nodes/host.py",
             "model_management.get_free_memory(device), unloadable,", "model_management.get_free_memory(device), 0,",
             (NATIVE + "test_native_check[auto_memory_counts_what_comfyui_can_unload_and_keeps_its_reserve]",)),
    Mutation("backbone-patcher-ignores-shrink", "nodes/host.py",
             "            if extra_memory < 0:\n                return -self.partially_unload(self.offload_device, "
             "-extra_memory)\n", "",
             (NATIVE + "test_native_check[backbone_patcher_follows_newer_comfyuis_calls]",)),
    # ------------------------------------------------------------------ windows.py
    Mutation("windows-imports-the-backbone-interface", "anyv2v_core/windows.py",
             "    num_frames = latents.shape[2]\n    if windows is None",
             "    from .backbones.base import Backbone  # noqa: F401\n    num_frames = latents.shape[2]\n    if windows is None",
             ("tests/test_package_layout.py::test_the_engine_has_no_import_circles",)),
    Mutation("windows-not-normalised", "anyv2v_core/windows.py",
             "return blended / total[None, None, :, None, None]", "return blended",
             ("tests/test_windows.py",)),
    Mutation("window-rows-not-sliced", "anyv2v_core/windows.py",
             "getattr(row, name)[:, :, start:end]", "getattr(row, name)[:, :, : end - start]",
             ("tests/test_windows.py::test_window_row_slices_only_frame_fields",)),
    Mutation("windows-too-few", "anyv2v_core/windows.py",
             "count = math.ceil((num_frames - self.overlap) / (self.length - self.overlap))",
             "count = math.ceil(num_frames / self.length)",
             ("tests/test_windows.py::test_spans_cover_every_frame_and_the_blend_is_a_partition_of_unity",)),
    # ------------------------------------------------------------------ memory.py and offload.py
    Mutation("other-backends-out-of-memory-missed", "anyv2v_core/memory.py",
             "isinstance(error, RuntimeError) and any(message.lower() in text for message in OUT_OF_MEMORY_MESSAGES))",
             'isinstance(error, RuntimeError) and False)',
             ("tests/test_interrupts.py::test_other_backends_out_of_memory_and_other_errors",)),
    Mutation("release-keeps-offload-hooks", "anyv2v_core/offload.py",
             "        for handle in self._handles:\n            handle.remove()",
             "        for handle in self._handles:\n            pass",
             ("tests/test_memory.py::test_release_removes_every_offload_hook",)),
    Mutation("offload-hooks-hold-the-offloader", "anyv2v_core/offload.py",
             "            live = offloader()\n            if live is not None:\n                live.enter(name)",
             "            self.enter(name)",
             ("tests/test_memory.py::test_a_dropped_backbone_frees_its_device_weights_at_once_without_the_garbage_collector[wan2.1-i2v]",)),
    # ------------------------------------------------------------------ the nodes' host glue
    Mutation("progress-ignores-cancel", "nodes/host.py",
             "        check_interrupted()\n        if bar is not None:", "        if bar is not None:",
             ("tests/test_interrupts.py::test_comfyui_cancel_during_the_sampler_nodes_decoding",
              NODES + "test_cancel_mid_sampling_leaves_the_backbone_unpatched")),
    Mutation("model-name-may-climb-out", "nodes/host.py",
             'or os.path.splitdrive(name)[0] or ".." in parts:', "or os.path.splitdrive(name)[0]:",
             ("tests/test_bad_inputs.py::test_node_paths_never_leave_the_model_folders",)),
    Mutation("instruct-pix2pix-model-unchecked", "nodes/first_frame.py",
             "        if mode == INSTRUCT_PIX2PIX:\n            try:", "        if mode == PASSTHROUGH:\n            try:",
             (NODES + "test_first_frame_editor_validation",)),
    Mutation("steps-error-under-width", "nodes/inversion.py",
             "def VALIDATE_INPUTS(cls, inversion_steps, sampling_steps):",
             "def VALIDATE_INPUTS(cls, width, inversion_steps, sampling_steps):",
             ("tests/test_comfyui_host.py::test_bad_inputs_are_validation_errors_under_the_inputs_they_are_about",)),
    # ------------------------------------------------------------------ saved workflows
    # the frontend maps a saved node's widget values to its inputs by position: reordering inputs without
    # migrating the saved workflows shifts every example's values (start_frame 3, every_nth 0)
    Mutation("inputs-reordered-without-migration", "nodes/video.py", SELECT_START + SELECT_EVERY,
             SELECT_EVERY + SELECT_START,
             (FRONTEND + "test_workflow_opens_in_the_frontend_as_saved_and_runs_from_the_run_button",)),
    # ------------------------------------------------------------------ issue 21: the promises an audit found unpinned
    Mutation("finer-inversion-grid-uneven", "anyv2v_core/flow_schedule.py",
             "between(low, high, Fraction(j, per_step)) if j else low",
             "between(low, high, Fraction(j, per_step + 1)) if j else low",
             (PROMISES + "test_a_finer_inversion_grid_evaluates_rising_sigmas_evenly_spaced_in_every_sampling_interval",)),
    Mutation("finer-inversion-grid-out-of-order", "anyv2v_core/flow_schedule.py",
             "for low, high in zip(coarse, coarse[1:]) for j in range(per_step)]",
             "for low, high in zip(coarse, coarse[1:]) for j in reversed(range(per_step))]",
             (PROMISES + "test_a_finer_inversion_grid_evaluates_rising_sigmas_evenly_spaced_in_every_sampling_interval",)),
    Mutation("loader-shift-ignored", "anyv2v_core/backbones/wan.py",
             "FlowMatchingSchedule(shift=defaults.shift if shift is None else shift)",
             "FlowMatchingSchedule(shift=defaults.shift)",
             (PROMISES + "test_the_loaders_shift_reaches_the_sigmas_the_transformer_receives",)),
    Mutation("cli-shift-dropped", "anyv2v_core/options.py",
             '(("shift", args.shift), ("attention_blocks", args.attention_blocks))',
             '(("shift", None), ("attention_blocks", args.attention_blocks))',
             (PROMISES + "test_the_cli_shift_reaches_the_sigmas_the_transformer_receives",
              PROMISES + "test_a_batch_jobs_shift_reaches_the_sigmas_the_transformer_receives")),
    Mutation("one-row-source-outputs-kept", "anyv2v_core/injection.py",
             "                injector.row = None\n                injector.source_outputs.clear()",
             "                injector.row = None",
             (PROMISES + "test_rows_one_at_a_time_hold_one_blocks_source_query_and_key_at_most_and_none_after_it",)),
    Mutation("encoders-stay-beside-the-transformer", "anyv2v_core/offload.py",
             "return other in ENCODERS and entering in DENOISERS",
             'return other in ENCODERS and entering == "unet"',
             (PROMISES + "test_policy_none_moves_the_encoders_off_the_device_before_the_wan_transformer_runs",)),
    Mutation("overflow-decode-converts-the-vae", "anyv2v_core/backbones/vae_frames.py",
             "        if self._float32 is None:\n            self._float32 = self.float32_copy()",
             "        if self._float32 is None:\n            self._float32 = self.vae.to(torch.float32)",
             (PROMISES + "test_a_half_precision_decode_redone_in_float32_leaves_the_vae_as_it_was",)),
    Mutation("select-frames-count-from-zero", "nodes/video.py",
             "min(total, start_frame + frame_count * every_nth)", "min(total, frame_count * every_nth)",
             (PROMISES + "test_select_frames_from_a_later_start_keeps_every_nth_up_to_the_count_at_the_matching_fps",)),
    Mutation("prepare-frames-zero-means-all", "anyv2v_core/video.py",
             "    if num_frames is not None:\n        if num_frames < min_frames:",
             "    if num_frames:\n        if num_frames < min_frames:",
             (PROMISES + "test_a_frame_count_of_zero_is_refused_at_every_entry_never_read_as_all_frames",)),
    Mutation("edit-settings-zero-frames-means-all", "anyv2v_core/plan.py",
             '"frame count": self.num_frames}', '"frame count": self.num_frames or None}',
             (PROMISES + "test_a_frame_count_of_zero_is_refused_at_every_entry_never_read_as_all_frames",)),
    Mutation("failed-job-counted-done", "anyv2v_core/batch/progress.py",
             "        if outcome.status == FAILED:", '        if outcome.status == "fail":',
             (BATCH + "test_a_job_that_fails_in_its_worker_is_counted_recorded_with_its_attempts_and_leaves_no_folder",
              BATCH + "test_on_ray_a_job_that_fails_in_its_worker_is_counted_recorded_with_its_attempts_and_leaves_no_folder")),
    Mutation("failure-without-attempts", "anyv2v_core/batch/progress.py",
             "id=outcome.job_id,\n                                         attempts=attempts).record())",
             "id=outcome.job_id).record())",
             (BATCH + "test_a_job_that_fails_in_its_worker_is_counted_recorded_with_its_attempts_and_leaves_no_folder",
              BATCH + "test_on_ray_a_job_that_fails_in_its_worker_is_counted_recorded_with_its_attempts_and_leaves_no_folder")),
    Mutation("result-committed-by-copying", "anyv2v_core/batch/store.py",
             "            os.rename(partial, out / job_id)", "            shutil.copytree(partial, out / job_id)",
             (BATCH + "test_a_result_appears_by_one_rename_and_a_crash_while_writing_it_leaves_nothing",)),
    Mutation("cache-temps-kept-after-the-run", "anyv2v_core/batch/runner.py",
             "        remove_leftovers(out, inversion_cache)  # from workers that died; the others are idle",
             "        pass  # from workers that died; the others are idle",
             (BATCH + "test_temporary_inversion_files_of_killed_workers_are_gone_when_a_run_starts_and_when_it_ends",)),
    Mutation("native-injection-left-on-the-model", "nodes/comfy_wan.py",
             "        finally:\n            handle.remove()\n        if sigma == 0:",
             "        finally:\n            pass\n        if sigma == 0:",
             (NATIVE_PROMISES + "test_the_model_is_left_as_it_was_after_a_success_an_error_and_a_cancel",)),
    Mutation("native-prompt-padding-misplaced", "nodes/comfy_wan.py",
             "(tensor, (0, 0, 0, longest - tensor.shape[1]))", "(tensor, (0, 0, longest - tensor.shape[1], 0))",
             (NATIVE_PROMISES + "test_rows_of_different_prompt_lengths_batch_with_each_rows_own_tokens",)),
    Mutation("native-time-in-model-units", "nodes/comfy_wan.py",
             "    def model_time(self, sigma: float) -> float:\n        return sigma",
             "    def model_time(self, sigma: float) -> float:\n        return sigma * self.num_train_timesteps",
             (NATIVE_PROMISES + "test_the_diffusion_model_runs_at_comfyuis_sigmas_in_its_own_time_units",)),
    # ------------------------------------------------------------------ modules that had no mutation before issue 21
    Mutation("inversion-file-casts-to-float32", "anyv2v_core/inversion_store.py",
             'tensors[name] = value.detach().to("cpu").clone(', 'tensors[name] = value.detach().to("cpu", torch.float32).clone(',
             ("tests/test_inversion_store.py::test_keys_and_fields_come_back_with_their_types",)),
    Mutation("wan-options-on-a-unet-accepted", "anyv2v_core/loading.py",
             "foreign = (set(options) & other.load_options) - family.load_options", "foreign = set()",
             (WAN + "test_bad_wan_input_fails_before_any_weight_loads",)),
    Mutation("seine-folder-not-recognised", "anyv2v_core/backbones/families.py",
             "        if family.find_layout(folder) is not None:\n            return family.names[0]",
             "        if False:\n            return family.names[0]",
             ("tests/test_loading.py::test_seine_layout_is_detected",)),
    Mutation("pickle-components-loaded-without-consent", "anyv2v_core/backbones/folders.py",
             "    if pickled and not allow_pickle:", "    if False:",
             ("tests/test_loading.py::test_pickle_only_weights_are_refused_unless_allowed",)),
    Mutation("job-groups-ignore-the-video", "anyv2v_core/batch/jobs.py",
             'group = {"load": backbone_options(args), "video": video_hash, ', 'group = {"load": backbone_options(args), ',
             ("tests/test_batch.py::test_job_ids_follow_content_and_settings_groups_follow_the_inversion",)),
    Mutation("dead-worker-not-counted", "anyv2v_core/batch/ray_runner.py",
             "                    actors[slot] = start_worker()\n                    progress.worker_replaced()",
             "                    actors[slot] = start_worker()",
             ("tests/test_batch_ray.py",)),
    Mutation("pickles-loaded-without-consent", "anyv2v_core/backbones/checkpoints.py",
             "    if not allow_pickle:\n        raise ModelLoadError(", "    if False:\n        raise ModelLoadError(",
             ("tests/test_seine_unet.py::test_pickles_are_refused_unless_allowed",)),
    Mutation("rotary-turns-the-wrong-way", "anyv2v_core/backbones/rotary.py",
             "return torch.stack((-second, first), dim=-1).flatten(-2)",
             "return torch.stack((second, -first), dim=-1).flatten(-2)",
             ("tests/test_seine_unet.py::test_rotary_only_rotates_first_dims_and_is_relative",
              "tests/test_consisti2v_unet.py::test_unet_forward_matches_reference")),
    Mutation("seine-first-frame-not-known", "anyv2v_core/backbones/seine.py",
             "        mask[:, :, 0] = 0\n        return SeineRow(", "        mask[:, :, 0] = 1\n        return SeineRow(",
             ("tests/test_seine_pipeline.py",)),
    Mutation("consisti2v-source-branch-keeps-the-source-frame", "anyv2v_core/backbones/consisti2v.py",
             "            return replace(source, first_frame_latents=edit.first_frame_latents)",
             "            return source",
             ("tests/test_consisti2v_pipeline.py::test_edit_latents_match_reference",)),
    Mutation("consisti2v-temporal-keys-unrotated", "anyv2v_core/backbones/consisti2v_unet.py",
             "k = torch.cat([self.rotary_emb.rotate(k[:, :num_frames]), k[:, num_frames:]], dim=1)",
             "k = torch.cat([k[:, :num_frames], k[:, num_frames:]], dim=1)",
             ("tests/test_consisti2v_unet.py::test_unet_forward_matches_reference",)),
    Mutation("seine-keys-unrotated", "anyv2v_core/backbones/seine_unet.py",
             "        k = self.rotary_emb.rotate(self.split_heads(k), seq_dim=-2)", "        k = self.split_heads(k)",
             ("tests/test_seine_unet.py::test_plain_case_and_intermediates",)),
    Mutation("capture-features-start-index-unchecked", "nodes/injection.py",
             "        if start_index >= steps:", "        if start_index > steps:",
             (NODES + "test_capture_features_validation",)),
    Mutation("sampler-node-drops-layer-overrides", "nodes/sampling.py",
             "injection=features.injection_for(backbone.backbone), cfg=cfg", "injection=features.injection, cfg=cfg",
             (NODES + "test_layer_override_reaches_the_sampler",)),
    Mutation("loader-accepts-any-repo-id", "nodes/loaders.py",
             "return check_repo_id(repo_id) or True", "return True",
             (NODES + "test_loader_validation",)),
    Mutation("wan-frame-count-unchecked", "nodes/wan.py",
             "if frame_count is not None and (frame_count - 1) % 4:", "if False and (frame_count - 1) % 4:",
             (PROMISES + "test_a_frame_count_of_zero_is_refused_at_every_entry_never_read_as_all_frames",)),
]


def scratch_copy(root: Path) -> Path:
    """The repository's tracked and unignored files under root/repo, with root/shared linking to ../shared."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    copy = root / "repo"  # an identifier, like a CI checkout folder
    for name in filter(None, files):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    shared = REPO.parent / "shared"
    if shared.is_dir():
        (root / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    return copy


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, float, str]:
    """(pytest's exit status, seconds, the first failing test or else pytest's last line)"""
    env = {**os.environ, "CI": "true", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - started, f"timed out after {TIMEOUT_S} s"
    lines = (result.stdout + result.stderr).strip().splitlines() or [""]
    failed = [line.split()[1].split("::")[-1] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return result.returncode, time.monotonic() - started, failed[0] if failed else lines[-1]


def stale_mutations(root: Path, mutations: list[Mutation]) -> list[tuple[Mutation, int]]:
    """(mutation, occurrences) for each mutation whose snippet is not exactly once in its file under `root`."""
    counts = [(m, (root / m.path).read_text().count(m.old) if (root / m.path).is_file() else 0) for m in mutations]
    return [(m, count) for m, count in counts if count != 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    parser.add_argument("--module", nargs="+", metavar="PATH",
                        help="run the mutations of these files only (a folder ending in / takes the files under it)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--smoke", action="store_true",
                        help="check that every snippet matches its file exactly once, run no mutation (seconds)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if (not args.only or m.name in args.only)
              and (not args.module or any(m.path == path or (path.endswith("/") and m.path.startswith(path))
                                          for path in args.module))]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    if not chosen:
        parser.error("no mutation matches --only / --module")
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name:40} {mutation.path}")
        return 0
    if args.smoke:
        stale = stale_mutations(REPO, chosen)
        for mutation, count in stale:
            print(f"STALE     {mutation.name}: its snippet occurs {count} times in {mutation.path}")
        print(f"{len(chosen)} mutation snippets checked, {len(stale)} stale")
        return 1 if stale else 0
    if not os.environ.get("COMFYUI_PYTHON"):
        for mutation in [m for m in chosen if any(test.startswith(HOST_TESTS) for test in m.tests)]:
            print(f"not run   {mutation.name}: its test starts a real ComfyUI (set COMFYUI_PYTHON and COMFYUI_DIR)")
            chosen.remove(mutation)

    failed = False
    with tempfile.TemporaryDirectory(prefix="anyv2v-mutation-") as scratch:
        copy = scratch_copy(Path(scratch))
        stale = stale_mutations(copy, chosen)
        for mutation, count in stale:
            print(f"STALE     {mutation.name}: its snippet occurs {count} times in {mutation.path}")
        stale = [mutation for mutation, _ in stale]
        runnable = [m for m in chosen if m not in stale]
        baseline = tuple(dict.fromkeys(test for m in runnable for test in m.tests))
        code, seconds, tail = run_tests(copy, baseline)
        print(f"baseline  {len(baseline)} test targets on the unmodified copy: exit {code} in {seconds:.0f} s {tail}")
        if code != 0:
            print("the listed tests must pass on the unmodified code before any mutation means anything")
            return 1
        print(f"\n| mutation | file | result | s |\n|---|---|---|---|")
        for mutation in runnable:
            path = copy / mutation.path
            original = path.read_text()
            path.write_text(original.replace(mutation.old, mutation.new))
            try:
                code, seconds, tail = run_tests(copy, mutation.tests)
            finally:
                path.write_text(original)
            if code == 1:
                result = f"caught by {tail}"
            elif code == 0:
                result = f"survived ({mutation.out_of_reach})" if mutation.out_of_reach else "SURVIVED"
                failed |= not mutation.out_of_reach
            else:
                result = f"ERROR (pytest exit {code}: {tail})"
                failed = True
            print(f"| {mutation.name} | {mutation.path} | {result} | {seconds:.0f} |", flush=True)
    return 1 if failed or stale else 0


if __name__ == "__main__":
    sys.exit(main())
