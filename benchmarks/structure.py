"""The engine's structure in numbers: its import circles, and the files one edit walks through.

Imports: every `import` of an `anyv2v_core` module by another (`anyv2v_core/testing/imports.py`:
module level, inside functions and under TYPE_CHECKING alike). A circle is a strongly connected
group of two or more modules.

Walk: `pipeline.edit` on the shipped toy I2VGen-XL, traced with `sys.setprofile`. Every engine
function called at most `--depth` calls below `edit` is listed once, in the order of its first
call (the loops' repetitions say nothing about structure); the walk is the files of that list.
A move is a change of file between neighbours, a return a move into a file the walk had left.

    python benchmarks/structure.py            # depth 2 and 3
    python benchmarks/structure.py --smoke    # the same numbers from a one-step edit (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from anyv2v_core.testing.imports import ENGINE, import_circles, import_graph  # noqa: E402


def traced_edit(steps: int) -> list[tuple[int, str, str]]:
    """(depth below `edit`, file, function) of every engine call during one toy edit, in order."""
    import torch

    from anyv2v_core import pipeline
    from anyv2v_core.loading import load_backbone
    from anyv2v_core.toy import world
    from anyv2v_core.toy.demo import SETTINGS, WEIGHTS

    backbone = load_backbone(WEIGHTS)
    scene = world.make_scene(0, max_objects=2)
    source = torch.from_numpy(world.render(scene))
    edited_first_frame = source[:1].flip(-1)  # any other first frame: the walk does not depend on it
    settings = type(SETTINGS)(**{**SETTINGS.__dict__, "inversion_steps": 2 * steps, "steps": steps})
    engine = str(REPO / ENGINE)
    calls: list[tuple[int, str, str]] = []
    depth = -1  # -1: outside `edit`

    def profile(frame, event, _arg):
        nonlocal depth
        code = frame.f_code
        if event == "call":
            if depth < 0:
                if code is pipeline.edit.__code__:
                    depth = 0
                return
            depth += 1
            if code.co_filename.startswith(engine):
                calls.append((depth, str(Path(code.co_filename).relative_to(REPO)), code.co_qualname))
        elif event == "return" and depth >= 0:
            depth -= 1

    sys.setprofile(profile)
    try:
        pipeline.edit(backbone, source, edited_first_frame, prompt="a recoloured shape", settings=settings)
    finally:
        sys.setprofile(None)
    return calls


def walk(calls: list[tuple[int, str, str]], max_depth: int) -> list[str]:
    """The files of the engine functions called at most `max_depth` below `edit`, each function once."""
    seen, files = set(), []
    for depth, file, function in calls:
        if depth <= max_depth and (file, function) not in seen:
            seen.add((file, function))
            files.append(file)
    return files


def moves_and_returns(files: list[str]) -> tuple[int, int]:
    moves = returns = 0
    left: set[str] = set()
    for previous, current in zip(["anyv2v_core/pipeline.py", *files], files):
        if current != previous:
            moves += 1
            returns += current in left
            left.add(previous)
    return moves, returns


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a one-step edit (the walk is the same)")
    parser.add_argument("--depth", type=int, nargs="+", default=[2, 3], help="call depths below edit to report")
    args = parser.parse_args(argv)
    graph = import_graph()
    circles = import_circles(graph)
    print(f"engine modules: {len(graph)}, import edges: {sum(map(len, graph.values()))}, circles: {len(circles)}")
    for group in circles:
        print("  circle: " + " <-> ".join(group))
    calls = traced_edit(steps=1 if args.smoke else 4)
    report = {"circles": circles, "walks": {}}
    for depth in args.depth:
        files = walk(calls, depth)
        moves, returns = moves_and_returns(files)
        report["walks"][depth] = {"files": len(set(files)), "moves": moves, "returns": returns}
        print(f"edit, depth <= {depth}: {len(files)} functions in {len(set(files))} files, "
              f"{moves} moves between files, {returns} of them back into a file it had left")
        trail = [file for i, file in enumerate(files) if i == 0 or files[i - 1] != file]
        print("  " + " -> ".join(Path(file).name for file in trail))
    return report


if __name__ == "__main__":
    main()
