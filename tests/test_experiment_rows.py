"""The experiment's rows and decision report (ued_fast.rows, experiment config keys): KD settings,
selection on validation only, uninformative flags, the verdict in results.md, config errors."""
import json

import pytest

from ued_fast import rows
from ued_fast.experiment import ConfigError, load_config, render_markdown, run_experiment, summarize


def test_kd_settings_default_grid_and_authors_ablation():
    kd = {"temperature": 4.0, "alpha": 0.9, "variant": "hinton",
          "select": {"temperature": [2, 4], "alpha": [0.5, 0.9]},
          "authors": {"rows": ["kd_uste_v1"], "temperature": [2, 6], "lambda": [0.1, 0.3]}}
    s = rows.kd_settings(kd, "kd_uste_v1")
    assert s[0] == rows.KDSetting("hinton", 4.0, 0.9, True)
    grid = [(x.temperature, x.alpha) for x in s if x.variant == "hinton" and not x.is_default]
    assert grid == [(2.0, 0.5), (2.0, 0.9), (4.0, 0.5)]  # (4, 0.9) is the default, run once
    authors = [(x.temperature, x.alpha) for x in s if x.variant == "authors"]
    assert authors == [(2.0, 0.1), (2.0, 0.3), (6.0, 0.1), (6.0, 0.3)]
    assert len({x.suffix() for x in s}) == len(s)  # distinct run names
    assert [x.variant for x in rows.kd_settings(kd, "kd_strong")].count("authors") == 0


def _fake_results(select=True):
    runs = []
    for seed in range(5):
        runs.append({"kind": "student", "name": "scratch", "seed": seed, "val_acc": 0.80, "test_acc": 0.80 + seed * 1e-3})
        # The default setting has the better TEST accuracy, the grid point the better VALIDATION one.
        for row, base in (("kd_uste_v1", 0.85), ("kd_uste_v2", 0.84), ("kd_strong", 0.82)):
            common = {"kind": "student", "seed": seed, "base_row": row, "teacher": row[3:], "teacher_test_acc": 0.9}
            runs.append({**common, "name": row, "val_acc": 0.80, "test_acc": base + 0.05 + seed * 1e-3,
                         "variant": "hinton", "temperature": 4.0, "alpha": 0.9})
            runs.append({**common, "name": f"{row}@T2_a0.5", "val_acc": 0.83, "test_acc": base + seed * 1e-3 + 1e-4 * seed ** 2,
                         "variant": "hinton", "temperature": 2.0, "alpha": 0.5})
            runs.append({**common, "name": f"{row}@authorsT2_l0.1", "val_acc": 0.99, "test_acc": 0.99,
                         "variant": "authors", "temperature": 2.0, "alpha": 0.1})
        runs.append({"kind": "student", "name": "kd_weak", "seed": seed, "base_row": "kd_weak", "val_acc": 0.5,
                     "test_acc": 0.5, "teacher": "weak", "teacher_test_acc": 0.81})
    kd = {"temperature": 4.0, "alpha": 0.9, "select": {"temperature": [2], "alpha": [0.5]} if select else None}
    return {"config": {"kd": kd, "dataset": "toy", "seeds": list(range(5))}, "runs": runs}


def test_selection_uses_validation_never_test_nor_the_ablation():
    res = _fake_results()
    chosen = rows.selected_settings(res)
    assert chosen["kd_uste_v1"]["run"] == "kd_uste_v1@T2_a0.5"  # better val, worse test
    assert chosen["kd_uste_v1"]["settings"] == 2  # the authors' runs are never candidates
    per_seed = rows.per_seed_test(res, use_selected=True)
    assert per_seed["kd_uste_v1"][0] == pytest.approx(0.85)
    assert rows.per_seed_test(res, use_selected=False)["kd_uste_v1"][0] == pytest.approx(0.90)


def test_uninformative_rows_and_verdict_line():
    res = _fake_results()
    bad = rows.uninformative_rows(res)
    assert set(bad) == {"kd_weak"} and bad["kd_weak"] == pytest.approx(0.81 - 0.802)
    c = rows.claim_summary(res)
    assert c["verdict"] == "holds", c["verdict_line"]
    others = {x["other"] for x in c["comparisons"]}
    assert others == {"scratch", "kd_strong", "kd_weak"}
    res["summary"] = {"claim": c}
    text = "\n".join(rows.render_claim_sections(res))
    assert "**Verdict (toy): the claim holds" in text and "kd_weak (+0.80)" in text
    # A USTE row whose teacher does not beat scratch makes the dataset undecided.
    for r in res["runs"]:
        if r.get("base_row") == "kd_uste_v2":
            r["teacher_test_acc"] = 0.805
    assert rows.claim_summary(res)["verdict"] == "undecided"


@pytest.mark.parametrize("override,match", [
    ({"kd": {"variant": "fitnets"}}, "kd.variant"),
    ({"kd": {"views": 0}}, "kd.views"),
    ({"kd": {"select": {"temperature": [2]}}}, "kd.select"),
    ({"kd": {"authors": {"rows": ["kd_uste_v1"], "temperature": [0], "lambda": [0.1]}}}, "kd.authors.temperature"),
    ({"rows": ["kd_uste_v1"]}, "'rows'"),
    ({"rows": ["scratch", "kd_bogus"]}, "'rows'"),
    ({"ops": {"backend": "fast"}}, "ops.backend"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("demo", override)


def test_tiny_experiment_all_rows_report_and_resume(tmp_path):
    cfg = load_config("demo", {
        "seeds": [0, 1], "train_subset": 300,
        "student": {"name": "teacher_s", "widths": [2, 4], "depths": [1, 1]},
        "sweep": [{"label": "t", "name": "teacher_s", "widths": [4, 8], "depths": [1, 1]}],
        "generalist": {"name": "generalist_ensemble", "width": 2, "depth": 1, "stages": 2},
        "uste_v1": {"name": "uste_v1", "width": 2, "depth": 1, "stages": 2},
        "uste_v2": {"name": "uste_v2", "width": 2, "depth": 1, "stages": 2},
        "train": {"epochs": 1, "batch_size": 64}, "teacher_train": {"epochs": 1},
        "kd": {"views": 2, "select": {"temperature": [2], "alpha": [0.5]},
               "authors": {"rows": ["kd_uste_v1"], "temperature": [2], "lambda": [0.1]}},
        "ops": {"backend": "reference"},
    })
    results = run_experiment(cfg, tmp_path)
    names = {r["name"] for r in results["runs"] if r["kind"] == "student"}
    for row in ("scratch", "kd_strong", "kd_matched", "kd_generalist", "kd_joint_generalist", "kd_uste_v1", "kd_uste_v2"):
        assert row in names
    assert "kd_uste_v1@authorsT2_l0.1" in names and "kd_uste_v2@T2_a0.5" in names
    teachers = {r["name"]: r for r in results["runs"] if r["kind"] == "teacher"}
    assert teachers["t"]["model"] == "teacher_s(widths=[4, 8], depths=[1, 1])"  # not the registry name alone
    assert set(teachers["uste_v1"]["entropies"]["authors"]) == {"2"}
    assert (tmp_path / "runs" / "seed0" / "teacher" / "uste_v1" / "view_outputs.pt").exists()
    md = (tmp_path / "results.md").read_text()
    assert "**Verdict (digits): undecided: fewer than 5 seeds" in md
    assert "Holm-corrected CI" in md and "Settings chosen on the validation split" in md
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["claim"]["verdict"] == "undecided"
    # Paired: every student row of a seed starts from the same weights (same init seed).
    again = run_experiment(cfg, tmp_path, resume=True)
    assert again["summary"]["claim"] == results["summary"]["claim"]
    assert render_markdown({**again, "summary": summarize(again) | {"claim": again["summary"]["claim"]}}).count("Verdict") == 1


@pytest.mark.parametrize("name,image", [("demo", (1, 8, 8)), ("fashion_mnist_claim", (1, 28, 28)),
                                        ("cifar10_claim", (3, 32, 32)), ("cifar10", (3, 32, 32))])
def test_configs_matched_teacher_is_within_10_percent_of_uste_v1(name, image):
    from ued_fast.models import build_model, count_macs, count_parameters

    cfg = load_config(name)
    v1_kwargs = {k: v for k, v in cfg["uste_v1"].items() if k not in ("name", "label")}
    size = {k: v for k, v in v1_kwargs.items() if k in ("width", "depth", "stages")}
    matched_kwargs = {"cover": cfg["cover"], **size,
                      **{k: v for k, v in cfg["matched"].items() if k not in ("name", "label")}}
    v1 = build_model("uste_v1", 10, image[0], image[1], cover=cfg["cover"], **v1_kwargs)
    matched = build_model(cfg["matched"]["name"], 10, image[0], image[1], **matched_kwargs)
    for count in (count_parameters, lambda m: count_macs(m, image)):
        a, b = count(matched), count(v1)
        assert abs(a - b) / b < 0.10, (name, a, b)
