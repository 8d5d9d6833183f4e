"""Property tests over the settings validators: every valid value is accepted, every invalid one is
refused with an AnyV2VError, and no input makes a validator raise anything else.

Each test states validity independently of the code under test (a plain-language rule written as
a predicate), and draws from valid values, near-misses and values of the wrong type.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyv2v_core.errors import AnyV2VError
from anyv2v_core.injection import InjectionSettings
from anyv2v_core.plan import EditSettings
from anyv2v_core.plan import check_sampling_settings
from anyv2v_core.diffusion_schedule import DiffusionSchedule
from anyv2v_core.toy.components import SCHEDULER_CONFIG
from anyv2v_core.video import check_size
from anyv2v_core.windows import ContextWindows

FEW = settings(max_examples=50, deadline=None, database=None)  # no .hypothesis/ folder in the checkout

WRONG_TYPES = st.one_of(st.none(), st.text(max_size=3), st.lists(st.integers(), max_size=2), st.complex_numbers())
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
NUMBERS = st.one_of(st.integers(-5, 2000), FLOATS)


def is_int(value) -> bool:
    return isinstance(value, int)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, complex)


def check(validate, valid: bool) -> None:
    """Run a validator: silent when `valid`, AnyV2VError otherwise, never another exception."""
    try:
        validate()
    except AnyV2VError:
        assert not valid, "a valid value was refused"
    else:
        assert valid, "an invalid value was accepted"


# ---------------------------------------------------------------------------------------------- InjectionSettings

TAUS = st.one_of(st.floats(0, 1), st.sampled_from([0, 1, 0.0, 1.0]), NUMBERS, WRONG_TYPES)


@FEW
@given(conv=TAUS, spatial=TAUS, temporal=TAUS)
def test_injection_settings(conv, spatial, temporal):
    valid = all(is_number(tau) and 0 <= tau <= 1 for tau in (conv, spatial, temporal))
    check(lambda: InjectionSettings(conv_tau=conv, spatial_tau=spatial, temporal_tau=temporal), valid)


# ---------------------------------------------------------------------------------------------- check_sampling_settings

STEP_COUNTS = st.one_of(st.integers(-3, 1000), FLOATS, WRONG_TYPES)
CFGS = st.one_of(st.floats(0.01, 30), FLOATS, st.integers(-3, 30), WRONG_TYPES)


@FEW
@given(steps=STEP_COUNTS, cfg=CFGS, start_index=st.one_of(st.integers(-3, 60), FLOATS, WRONG_TYPES))
def test_check_sampling_settings(steps, cfg, start_index):
    valid = (is_int(steps) and steps >= 1 and is_int(start_index) and 0 <= start_index < steps
             and is_number(cfg) and 0 < cfg < math.inf)
    check(lambda: check_sampling_settings(steps, cfg, start_index), valid)


# ---------------------------------------------------------------------------------------------- check_inversion_steps

SCHEDULE = DiffusionSchedule.from_scheduler_config(SCHEDULER_CONFIG)  # 1000 training timesteps, as every backbone
TRAIN_STEPS = SCHEDULE.num_train_timesteps


def inversion_reaches_sampling(inversion_steps: int, sampling_steps: int) -> bool:
    """Leading spacing: sampling visits k * (T // s) for k < s, inversion j * (T // i) for j < i.
    Every sampling timestep is an inversion target iff the inversion stride divides the sampling
    stride and the inversion climbs at least as high."""
    sampling_stride, inversion_stride = TRAIN_STEPS // sampling_steps, TRAIN_STEPS // inversion_steps
    return (sampling_stride % inversion_stride == 0
            and (sampling_steps - 1) * sampling_stride <= (inversion_steps - 1) * inversion_stride)


@FEW
@given(inversion_steps=st.one_of(st.integers(-2, 1002), st.sampled_from([100, 200, 500, 1000]), FLOATS, WRONG_TYPES),
       sampling_steps=st.one_of(st.integers(-2, 1002), st.sampled_from([10, 25, 50]), FLOATS, WRONG_TYPES))
def test_check_inversion_steps(inversion_steps, sampling_steps):
    in_range = all(is_int(n) and 1 <= n <= TRAIN_STEPS for n in (inversion_steps, sampling_steps))
    valid = in_range and inversion_reaches_sampling(inversion_steps, sampling_steps)
    check(lambda: SCHEDULE.check_inversion_steps(inversion_steps, sampling_steps), valid)


@pytest.mark.parametrize("inversion_steps, sampling_steps, valid",
                         [(500, 50, True), (100, 50, True), (1000, 25, True), (30, 10, False), (501, 600, False)])
def test_check_inversion_steps_examples(inversion_steps, sampling_steps, valid):
    """Anchors for the rule above, with the paper's settings among them."""
    assert inversion_reaches_sampling(inversion_steps, sampling_steps) == valid
    check(lambda: SCHEDULE.check_inversion_steps(inversion_steps, sampling_steps), valid)


# ---------------------------------------------------------------------------------------------- check_size

SIDES = st.one_of(st.integers(-16, 2048), st.integers(1, 256).map(lambda n: 8 * n), FLOATS, WRONG_TYPES)
SIZES = st.one_of(st.tuples(SIDES, SIDES), st.lists(SIDES, max_size=3), WRONG_TYPES)


@FEW
@given(size_wh=SIZES)
def test_check_size(size_wh):
    valid = (isinstance(size_wh, (tuple, list)) and len(size_wh) == 2
             and all(is_int(side) and side >= 8 and side % 8 == 0 for side in size_wh))
    check(lambda: check_size(size_wh), valid)


# ---------------------------------------------------------------------------------------------- ContextWindows

@FEW
@given(length=st.one_of(st.integers(-2, 64), FLOATS, WRONG_TYPES), overlap=st.one_of(st.integers(-2, 64), WRONG_TYPES))
def test_context_windows(length, overlap):
    valid = is_int(length) and length >= 2 and is_int(overlap) and 0 <= overlap < length
    check(lambda: ContextWindows(length, overlap), valid)


# ---------------------------------------------------------------------------------------------- EditSettings

OPTIONAL_COUNTS = st.one_of(st.none(), st.integers(-2, 1000), FLOATS, st.text(max_size=2))


def valid_edit_settings(f: dict) -> bool:
    def count_ok(value):
        return value is None or (is_int(value) and value >= 1)

    def start_ok():
        start, steps = f["start_index"], f["steps"]
        if start is None:
            return True
        if not is_int(start) or start < 0:
            return False
        return steps is None or start < steps

    cfg_ok = f["cfg"] is None or (is_number(f["cfg"]) and 0 < f["cfg"] < math.inf)
    size = f["size_wh"]
    size_ok = size is None or (len(size) == 2 and all(is_int(s) and s >= 8 and s % 8 == 0 for s in size))
    return (all(count_ok(f[name]) for name in ("steps", "inversion_steps", "fps", "num_frames"))
            and cfg_ok and start_ok() and size_ok
            and f["resize"] in ("stretch", "crop", "pad")
            and is_int(f["decode_chunk_size"]) and f["decode_chunk_size"] >= 1
            and f["sampler"] in (None, "ddim", "ddpm")
            and is_int(f["seed"]) and 0 <= f["seed"] < 2**64)


@settings(max_examples=80, deadline=None, database=None)
@given(st.fixed_dictionaries({
    "steps": OPTIONAL_COUNTS,
    "inversion_steps": OPTIONAL_COUNTS,
    "fps": OPTIONAL_COUNTS,
    "num_frames": OPTIONAL_COUNTS,
    "cfg": st.one_of(st.none(), CFGS),
    "start_index": st.one_of(st.none(), st.integers(-2, 60), FLOATS, st.text(max_size=2)),
    "size_wh": st.one_of(st.none(), st.tuples(SIDES, SIDES), st.tuples(SIDES)),
    "resize": st.one_of(st.sampled_from(["stretch", "crop", "pad"]), st.text(max_size=5)),
    "decode_chunk_size": st.one_of(st.integers(-2, 64), FLOATS, st.none()),
    "sampler": st.one_of(st.sampled_from([None, "ddim", "ddpm"]), st.text(max_size=5)),
    "seed": st.one_of(st.integers(0, 2**64 - 1), st.integers(-2**65, 2**65), FLOATS, st.none()),
}))
def test_edit_settings(fields):
    check(lambda: EditSettings(**fields), valid_edit_settings(fields))
