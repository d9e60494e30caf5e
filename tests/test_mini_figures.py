"""The miniature's figures and §4 tables: PIL charts, ``python -m mini.tables`` (Table 1 against a brute-force
score of every caption with every image) and ``python -m mini.curves`` (Figure 5's curves from cached rows)."""
import json

import numpy as np
import torch
from PIL import Image

from mini import curves, plots, tables, world
from mini.metrics import SHIPPED, renders
from model.preference import Scorer, load_direction


def test_ticks_are_round_and_cover_the_range():
    for low, high in [(0.0, 1.0), (83.2, 88.9), (0.071, 0.4), (0, 400)]:
        ticks = plots.nice_ticks(low, high)
        step = ticks[1] - ticks[0]
        assert ticks[0] <= low and ticks[-1] >= high and 3 <= len(ticks) <= 12
        assert any(abs(step / 10 ** np.floor(np.log10(step)) - m) < 1e-9 for m in (1, 2, 5))


def test_line_chart_draws_each_series_in_its_colour(tmp_path):
    path = tmp_path / "chart.png"
    plots.line_chart({"a": [(0, 1.0), (10, 2.0)], "b": [(0, 2.0), (10, 1.0)]}, path, "t", "x", "y")
    pixels = {tuple(p) for p in np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)}
    assert Image.open(path).size == plots.SIZE
    assert plots.PALETTE[0] in pixels and plots.PALETTE[1] in pixels and plots.PALETTE[2] not in pixels


def test_table1_average_equals_a_brute_force_ranking_by_score(tmp_path):
    out = tmp_path / "tables.md"
    assert tables.main(["--scorer", f"shipped={SHIPPED / 'scorer'}", "--scenes", "8", "-o", str(out),
                        "--figures", str(tmp_path)]) == 0
    assert (tmp_path / "eta.png").is_file()
    row = next(line for line in out.read_text().splitlines() if line.startswith("| shipped |"))
    average_c = float(row.split("|")[4])

    # Oracle: the scorer's own per-pair score (the fused projection's original part) for all 8 × 8 pairs.
    scorer = Scorer.load(SHIPPED / "scorer", dtype=torch.float32)
    direction = load_direction(SHIPPED / "scorer" / "direction.safetensors")
    examples = world.shapes_split("test", 8)
    images = renders(examples).permute(0, 3, 1, 2).float().div(255)
    captions = [c for _, c in examples]
    scores = torch.stack([scorer.score(images, [caption] * 8, direction).original for caption in captions])
    expected = 100 * (scores.argmax(dim=1) == torch.arange(8)).float().mean().item()
    assert abs(average_c - expected) < 0.05


def write_row(folder, name, **numbers):
    folder.mkdir(parents=True, exist_ok=True)
    result = {"name": name, "all": 80.0, "after77": 70.0, "fd": 0.2, "original": 14.0, "relevant": 5.0, **numbers}
    (folder / f"{len(list(folder.iterdir()))}.json").write_text(json.dumps({"settings": {}, "result": result}))


def test_curves_draw_every_measure_and_tabulate_each_seed(tmp_path):
    for seed in ("0", "1"):
        rows = tmp_path / f"seed{seed}.md.rows"
        write_row(rows, "SFT step 0", all=87.5)
        write_row(rows, "ω=0.3 step 100", all=88.25 + int(seed))
        write_row(rows, "ω=1 step 100", all=86.0)
        write_row(rows, "an unrelated row")
    out = tmp_path / "curves.md"
    argv = ["--seed-rows", f"0={tmp_path / 'seed0.md.rows'}", "--seed-rows", f"1={tmp_path / 'seed1.md.rows'}",
            "-o", str(out), "--figures", str(tmp_path / "figures")]
    assert curves.main(argv) == 0
    assert all((tmp_path / "figures" / name).is_file() for _, name in curves.MEASURES.values())
    lines = out.read_text().splitlines()
    assert len(lines) == 2 + 3  # header, rule, and the three runs
    assert "| ω=0.3 | 100 | 88.2 | 89.2 |" in out.read_text()  # facts, all: seed 0 then seed 1


def test_curves_refuse_a_missing_folder(tmp_path, capsys):
    assert curves.main(["--seed-rows", f"0={tmp_path / 'none'}"]) == 2
    assert "mini.evaluate" in capsys.readouterr().err
