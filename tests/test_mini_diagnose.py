"""python -m mini.diagnose, the diagnosis of where the miniature loses the caption: its instruments
(mini/probes.py) measure what they claim, and the script runs on the shipped miniature."""
import random
from pathlib import Path

import numpy as np

from mini import diagnose, probes
from mini.world import POSITIONS, Scene, ShapeObject, render, shapes_example

ROOT = Path(__file__).resolve().parent.parent


def test_the_probe_reads_a_linear_code_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 600)
    codes = rng.normal(size=(5, 16))
    features = codes[labels] + 0.1 * rng.normal(size=(600, 16))  # each class a fixed direction, plus noise
    assert probes.ridge_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:], 5) == 1.0
    noise = rng.normal(size=(600, 16))  # features unrelated to the labels: about chance (20%)
    assert probes.ridge_probe_accuracy(noise[:400], labels[:400], noise[400:], labels[400:], 5) < 0.35


def test_the_script_runs_on_the_shipped_miniature(capsys, tmp_path):
    pipeline = tmp_path / "pipeline"  # a pipeline without scorer/, as train.py exports: the shipped scorer is used
    pipeline.mkdir()
    for part in (ROOT / "weights" / "mini").iterdir():
        if part.name != "scorer":
            (pipeline / part.name).symlink_to(part)
    assert diagnose.main(["--weights", str(pipeline), "--scenes", "4", "--probe-sentences", "200", "100",
                          "--colour-scenes", "2", "--scorer-scenes", "6"]) == 0
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
    red = ShapeObject(0, "square", "red", "large", (0, 0))
    blue = ShapeObject(4, "square", "blue", "large", (0, 0))
    scene = Scene((red, blue), ())
    swapped = Scene((ShapeObject(0, "square", "blue", "large", (0, 0)),
                          ShapeObject(4, "square", "red", "large", (0, 0))), ())
    green = Scene((ShapeObject(0, "square", "green", "large", (0, 0)),), ())
    assert probes.colour_source(np.array(render(scene)), scene, red) == "the named colour"
    assert probes.colour_source(np.array(render(swapped)), scene, red) == "another object's colour"
    assert probes.colour_source(np.array(render(green)), scene, red) == \
        "a colour the caption does not name"
    assert probes.colour_source(np.array(render(green)), scene, blue) == "no object drawn"


def test_the_scorer_errors_change_exactly_one_fact_and_keep_the_wording():
    rng = random.Random(0)
    for index in range(40):
        scene, text = shapes_example("test", index)
        assert probes.same_wording_caption("test", index, scene) == text
        swapped = probes.swap_two_colours(scene, rng)
        changed = [(a, b) for a, b in zip(scene.objects, swapped.objects) if a != b]
        assert len(changed) == 2 and changed[0][0].color == changed[1][1].color != changed[0][1].color
        replaced = probes.replace_one_colour(scene, rng)
        if replaced is not None:
            (old, new), = [(a, b) for a, b in zip(scene.objects, replaced.objects) if a != b]
            assert new.color not in {o.color for o in scene.objects} and new.cell == old.cell
        moved = probes.move_one_object(scene, rng)
        if moved is not None:
            (old, new), = [(a, b) for a, b in zip(scene.objects, moved.objects) if a != b]
            assert new.cell not in {o.cell for o in scene.objects} | set(scene.empty_mentioned)
            wrong = probes.same_wording_caption("test", index, moved)
            assert wrong.replace(POSITIONS[new.cell], POSITIONS[old.cell]) == text
    one_colour = Scene((ShapeObject(0, "square", "red", "large", (0, 0)),
                             ShapeObject(4, "circle", "red", "small", (0, 0))), ())
    assert probes.swap_two_colours(one_colour, rng) is None


def test_the_script_says_a_missing_pipeline_in_one_line(tmp_path, capsys):
    assert diagnose.main(["--weights", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and len(err.splitlines()) == 1
