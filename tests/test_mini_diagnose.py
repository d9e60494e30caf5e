"""bench/mini_diagnose.py: its ridge probe reads what is linearly there and nothing else, and the script runs on
the shipped miniature (issue 7's diagnosis of where the text conditioning is lost)."""
import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("mini_diagnose", ROOT / "bench" / "mini_diagnose.py")
mini_diagnose = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mini_diagnose)


def test_the_probe_reads_a_linear_code_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 600)
    codes = rng.normal(size=(5, 16))
    features = codes[labels] + 0.1 * rng.normal(size=(600, 16))  # each class a fixed direction, plus noise
    assert mini_diagnose.ridge_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:], 5) == 1.0
    noise = rng.normal(size=(600, 16))  # features unrelated to the labels: about chance (20%)
    assert mini_diagnose.ridge_probe_accuracy(noise[:400], labels[:400], noise[400:], labels[400:], 5) < 0.35


def test_the_script_runs_on_the_shipped_miniature(capsys, tmp_path):
    pipeline = tmp_path / "pipeline"  # a pipeline without scorer/, as train.py exports: the shipped scorer is used
    pipeline.mkdir()
    for part in (ROOT / "weights" / "mini").iterdir():
        if part.name != "scorer":
            (pipeline / part.name).symlink_to(part)
    mini_diagnose.main(["--weights", str(pipeline), "--scenes", "4", "--probe-sentences", "200", "100",
                        "--colour-scenes", "2", "--scorer-scenes", "6"])
    out = capsys.readouterr().out
    assert "| colour | 8 |" in out and "| 950 |" in out and "| drawn in the object's cell |" in out
    assert "| two objects' colours swapped |" in out and "| one object moved |" in out
    shares = [float(line.split("|")[2]) for line in out.splitlines()
              if line.startswith(("| the named", "| another object", "| a colour", "| no object"))]
    assert len(shares) == 4 and abs(sum(shares) - 100) < 0.5  # every object lands in exactly one row
    probe_rows = [line for line in out.splitlines() if line.startswith(("| cell", "| colour", "| shape", "| size"))]
    accuracies = [float(row.split("|")[3]) for row in probe_rows]
    assert len(accuracies) == 4 and all(0 <= a <= 100 for a in accuracies)


def test_colour_source_names_where_a_cells_colour_comes_from():
    import data
    red = data.ShapeObject(0, "square", "red", "large", (0, 0))
    blue = data.ShapeObject(4, "square", "blue", "large", (0, 0))
    scene = data.Scene((red, blue), ())
    swapped = data.Scene((data.ShapeObject(0, "square", "blue", "large", (0, 0)),
                          data.ShapeObject(4, "square", "red", "large", (0, 0))), ())
    green = data.Scene((data.ShapeObject(0, "square", "green", "large", (0, 0)),), ())
    assert mini_diagnose.colour_source(np.array(data.render(scene)), scene, red) == "the named colour"
    assert mini_diagnose.colour_source(np.array(data.render(swapped)), scene, red) == "another object's colour"
    assert mini_diagnose.colour_source(np.array(data.render(green)), scene, red) == \
        "a colour the caption does not name"
    assert mini_diagnose.colour_source(np.array(data.render(green)), scene, blue) == "no object drawn"


def test_the_scorer_errors_change_exactly_one_fact_and_keep_the_wording():
    import random

    import data
    rng = random.Random(0)
    for index in range(40):
        scene, text = data.shapes_example("test", index)
        assert mini_diagnose.same_wording_caption("test", index, scene) == text
        swapped = mini_diagnose.swap_two_colours(scene, rng)
        changed = [(a, b) for a, b in zip(scene.objects, swapped.objects) if a != b]
        assert len(changed) == 2 and changed[0][0].color == changed[1][1].color != changed[0][1].color
        replaced = mini_diagnose.replace_one_colour(scene, rng)
        if replaced is not None:
            (old, new), = [(a, b) for a, b in zip(scene.objects, replaced.objects) if a != b]
            assert new.color not in {o.color for o in scene.objects} and new.cell == old.cell
        moved = mini_diagnose.move_one_object(scene, rng)
        if moved is not None:
            (old, new), = [(a, b) for a, b in zip(scene.objects, moved.objects) if a != b]
            assert new.cell not in {o.cell for o in scene.objects} | set(scene.empty_mentioned)
            wrong = mini_diagnose.same_wording_caption("test", index, moved)
            assert wrong.replace(data.POSITIONS[new.cell], data.POSITIONS[old.cell]) == text
    one_colour = data.Scene((data.ShapeObject(0, "square", "red", "large", (0, 0)),
                             data.ShapeObject(4, "circle", "red", "small", (0, 0))), ())
    assert mini_diagnose.swap_two_colours(one_colour, rng) is None
