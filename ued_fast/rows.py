"""The student rows of the experiment: their KD settings (the fixed default, the validation grid, the
authors' ablation), their training (cached teacher views or the teacher run live), and the
decision-rule report (selection on validation, the paired table, the verdict line).

Selection (kd.select): for every KD row, each (T, alpha) of the grid is trained for every seed; the
setting with the highest validation accuracy (mean over seeds) is that row's chosen setting, and the
row's test accuracy is read at that setting only. Validation never sees the test set; the test
accuracy of the other settings is recorded by the training loop but never used to choose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import stats
from .distill_losses import VARIANTS, distill_loss
from .teacher_cache import ViewBatches, ViewSet, cached_teacher_outputs

CLAIM_ROWS = ("kd_uste_v1", "kd_uste_v2")


@dataclass(frozen=True)
class KDSetting:
    variant: str
    temperature: float
    alpha: float  # lambda for the authors' variant
    is_default: bool

    def suffix(self) -> str:
        if self.is_default:
            return ""
        tag = "l" if self.variant == "authors" else "a"
        prefix = "authors" if self.variant == "authors" else ""
        return f"@{prefix}T{self.temperature:g}_{tag}{self.alpha:g}"


def check_kd_config(kd: dict) -> None:
    """Errors name the key (ValueError; the experiment re-raises them as ConfigError)."""
    if kd.get("variant", "hinton") not in VARIANTS:
        raise ValueError(f"'kd.variant' must be one of {VARIANTS}, got {kd.get('variant')!r}")
    views = kd.get("views")
    if views is not None and (isinstance(views, bool) or not isinstance(views, int) or views < 1):
        raise ValueError(f"'kd.views' must be an int >= 1 or null, got {views!r}")
    for key, grid_keys in (("select", ("temperature", "alpha")), ("authors", ("temperature", "lambda", "rows"))):
        grid = kd.get(key)
        if grid is None:
            continue
        if not isinstance(grid, dict) or set(grid) - set(grid_keys) or not all(k in grid for k in grid_keys):
            raise ValueError(f"'kd.{key}' must be null or a mapping with keys {list(grid_keys)}, got {grid!r}")
        for k in grid_keys:
            if not isinstance(grid[k], list) or not grid[k]:
                raise ValueError(f"'kd.{key}.{k}' must be a non-empty list, got {grid[k]!r}")
        for t in grid["temperature"]:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
                raise ValueError(f"'kd.{key}.temperature' values must be > 0, got {t!r}")


def kd_settings(kd: dict, row: str) -> list[KDSetting]:
    """The default setting first, then the validation grid, then (for the rows it names) the
    authors' ablation."""
    default = KDSetting(kd.get("variant", "hinton"), float(kd["temperature"]), float(kd["alpha"]), True)
    out = [default]
    if kd.get("select"):
        for t in kd["select"]["temperature"]:
            for a in kd["select"]["alpha"]:
                s = KDSetting(default.variant, float(t), float(a), False)
                if (s.temperature, s.alpha) != (default.temperature, default.alpha):
                    out.append(s)
    if kd.get("authors") and row in kd["authors"]["rows"]:
        out += [KDSetting("authors", float(t), float(lam), False)
                for t in kd["authors"]["temperature"] for lam in kd["authors"]["lambda"]]
    return out


def student_views(kd: dict, augment, splits, seed: int):
    """The fixed views of this seed's training images (None: fresh augmentation every epoch)."""
    if kd.get("views") is None:
        return None
    return ViewSet(splits.train_x.shape[0], int(kd["views"]), augment, int(kd.get("view_seed", 0)) + 1000 * seed,
                   splits.train_x.device)


def make_step(setting: KDSetting | None, teacher=None, source: ViewBatches | None = None, backend=None):
    """step_loss for fit: cross-entropy (setting None), or distillation from the cached view outputs
    (source.targets) or from the teacher run on the batch."""
    def step(model, images, labels):
        if setting is None:
            return model.training_loss(images, labels)
        if source is not None and source.teacher_outputs is not None:
            t = source.targets
        else:
            with torch.no_grad():
                t = teacher(images)
        s = model(images)
        return distill_loss(setting.variant, s, t, labels, temperature=setting.temperature, alpha=setting.alpha,
                            backend=backend), s

    return step


def train_student(model, splits, cfg, augment, opts, *, setting=None, teacher=None, views=None,
                  teacher_outputs=None, backend=None) -> dict:
    """One student run: scratch (setting None) or KD; on the views when given (cached teacher outputs)."""
    from .train import _to_device_model, fit

    if teacher is not None and teacher_outputs is None:
        teacher = _to_device_model(teacher, opts.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    source = ViewBatches(splits.train_x, views, splits.mean, splits.std, teacher_outputs) if views is not None else None
    result = fit(model, splits, cfg, augment, opts, make_step(setting, teacher, source, backend), batch_fn=source)
    if setting is not None:
        result.update({"variant": setting.variant, "temperature": setting.temperature, "alpha": setting.alpha})
    return result


def teacher_outputs_for(teacher, splits, views, cache_dir):
    """[N, V, C] cached outputs of the frozen teacher on the views (None without views)."""
    if views is None:
        return None
    from .train import _prep_images, _to_device_model

    device = splits.train_x.device
    teacher = _to_device_model(teacher, device)
    out, _ = cached_teacher_outputs(teacher, splits.train_x, views, splits.mean, splits.std, cache_dir,
                                    prepare=lambda x: _prep_images(x, device))
    return out


def teacher_entropies(test_outputs: torch.Tensor, kd: dict) -> dict:
    """Soft-target entropy (nats, mean over the test set) at every temperature a row may use:
    {'hinton': {T: H(softmax(t/T))}, 'authors': {T: H(softmax(softmax(t)/T))}}."""
    from .train import soft_target_entropy

    temps = {float(kd["temperature"])}
    if kd.get("select"):
        temps |= {float(t) for t in kd["select"]["temperature"]}
    out = {"hinton": {f"{t:g}": soft_target_entropy(test_outputs, t) for t in sorted(temps)}}
    if kd.get("authors") or kd.get("variant") == "authors":
        a_temps = {float(t) for t in (kd.get("authors") or {}).get("temperature", [])}
        if kd.get("variant") == "authors":
            a_temps.add(float(kd["temperature"]))
        probs = torch.softmax(test_outputs.float(), dim=1)
        out["authors"] = {f"{t:g}": soft_target_entropy(probs, t) for t in sorted(a_temps)}
    return out


# --- Reporting ------------------------------------------------------------------------------------

def _student_runs(results: dict) -> list[dict]:
    return [r for r in results["runs"] if r["kind"] == "student"]


def _base_row(r: dict) -> str:
    return r.get("base_row", r["name"].split("@")[0])


def selected_settings(results: dict) -> dict:
    """base row -> {'run': run name chosen on validation (mean over seeds), 'val_acc', 'settings'}."""
    by_row: dict = {}
    for r in _student_runs(results):
        if r.get("variant", "hinton") == "authors":
            continue  # the ablation is reported, never selected into a main row
        by_row.setdefault(_base_row(r), {}).setdefault(r["name"], []).append(r)
    out = {}
    for row, runs in by_row.items():
        means = {name: float(np.mean([x["val_acc"] for x in rs])) for name, rs in runs.items()}
        best = max(means, key=lambda n: (means[n], n == row))  # ties: the default setting
        first = runs[best][0]
        out[row] = {"run": best, "val_acc": means[best], "settings": len(runs),
                    "temperature": first.get("temperature"), "alpha": first.get("alpha")}
    return out


def per_seed_test(results: dict, use_selected: bool) -> dict:
    """row -> {seed: test accuracy} at the chosen setting (or the default one)."""
    chosen = selected_settings(results) if use_selected else {}
    out: dict = {}
    for r in _student_runs(results):
        row = _base_row(r)
        if r.get("variant", "hinton") == "authors":
            continue
        want = chosen[row]["run"] if row in chosen else row
        if r["name"] == want:
            out.setdefault(row, {})[r["seed"]] = r["test_acc"]
    return out


def uninformative_rows(results: dict, margin: float = stats.MIN_TEACHER_GAIN) -> dict:
    """KD row -> (teacher acc - scratch acc), for rows whose teacher does not beat the scratch
    student by `margin` (mean over seeds of the paired difference)."""
    scratch = {r["seed"]: r["test_acc"] for r in _student_runs(results) if r["name"] == "scratch"}
    gains: dict = {}
    for r in _student_runs(results):
        if r.get("teacher_test_acc") is None or r["seed"] not in scratch:
            continue
        gains.setdefault(_base_row(r), {})[r["seed"]] = r["teacher_test_acc"] - scratch[r["seed"]]
    return {row: float(np.mean(list(g.values()))) for row, g in gains.items()
            if np.mean(list(g.values())) < margin}


def claim_summary(results: dict) -> dict:
    cfg = results["config"]
    use_selected = bool(cfg["kd"].get("select"))
    per_seed = per_seed_test(results, use_selected)
    rows = [r for r in CLAIM_ROWS if r in per_seed]
    others = [r for r in per_seed if r not in CLAIM_ROWS]
    bad = uninformative_rows(results)
    out = {"use_selected": use_selected, "selected": selected_settings(results), "uninformative": bad,
           "comparisons": [], "verdict": "undecided", "verdict_line": "undecided: the USTE rows or the others are missing"}
    if rows and others:
        comps = stats.compare_rows(per_seed, rows, others)
        code, line = stats.verdict(comps, uninformative=list(bad))
        out.update({"comparisons": [c.as_dict() for c in comps], "verdict": code, "verdict_line": line})
    return out


def _pts(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.2f}"


def render_claim_sections(results: dict) -> list[str]:
    cfg = results["config"]
    c = results["summary"].get("claim") or claim_summary(results)
    lines = ["", "## Decision rule: paired comparisons (Holm-corrected)", ""]
    how = ("at the setting chosen on the validation split" if c["use_selected"] else "at the fixed default setting")
    lines += [f"Per seed, d = acc(USTE row) - acc(other row), {how}; mean of d and its 95% t interval, then "
              f"the interval at the Holm level (alpha = {stats.ALPHA}, over all {len(c['comparisons'])} comparisons). "
              f"The claim holds only if every corrected interval lies above 0, with >= {stats.MIN_SEEDS} seeds.", "",
              "| USTE row | other row | seeds | mean d (points) | 95% CI | Holm level | Holm-corrected CI | Holm p |",
              "|---|---|---|---|---|---|---|---|"]
    for x in c["comparisons"]:
        lines.append(f"| {x['row']} | {x['other']} | {x['n']} | {_pts(x['mean_diff'])} | "
                     f"[{_pts(x['ci_low'])}, {_pts(x['ci_high'])}] | {x['holm_level']:.4f} | "
                     f"[{_pts(x['holm_ci_low'])}, {_pts(x['holm_ci_high'])}] | {x['holm_p']:.3g} |")
    lines += ["", f"**Verdict ({cfg['dataset']}): {c['verdict_line']}**", ""]
    if c["uninformative"]:
        lines.append("Uninformative rows (the teacher does not beat the scratch student by "
                     f"{100 * stats.MIN_TEACHER_GAIN:.0f} points, mean over seeds): " +
                     ", ".join(f"{row} ({100 * g:+.2f})" for row, g in sorted(c["uninformative"].items())) + ".")
        lines.append("")
    if c["selected"] and c["use_selected"]:
        lines += ["## Settings chosen on the validation split", "",
                  "| row | chosen run | T | alpha | settings tried | mean val acc % |", "|---|---|---|---|---|---|"]
        for row, s in c["selected"].items():
            lines.append(f"| {row} | {s['run']} | {s['temperature'] if s['temperature'] is not None else '-'} | "
                         f"{s['alpha'] if s['alpha'] is not None else '-'} | {s['settings']} | {100 * s['val_acc']:.2f} |")
        lines.append("")
    return lines


def render_all_runs_table(results: dict) -> list[str]:
    """Every student run name (default, grid, ablation): test/val mean ± std, the teacher's
    soft-target entropy at the run's own temperature and variant."""
    runs: dict = {}
    for r in _student_runs(results):
        runs.setdefault(r["name"], []).append(r)
    lines = ["## Every student run (default setting, validation grid, authors' ablation)", "",
             "| run | variant | T | alpha/lambda | seeds | test acc % | val acc % | teacher test acc % | "
             "teacher soft-target entropy (nats) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        first = rs[0]
        test = np.array([x["test_acc"] for x in rs]) * 100
        val = np.array([x["val_acc"] for x in rs]) * 100
        ent = [x.get("teacher_entropy_at_T") for x in rs if x.get("teacher_entropy_at_T") is not None]
        tacc = [x["teacher_test_acc"] for x in rs if x.get("teacher_test_acc") is not None]
        sd = (lambda a: a.std(ddof=1) if a.size > 1 else 0.0)
        lines.append(f"| {name} | {first.get('variant', '-') if first.get('teacher') else '-'} | "
                     f"{first.get('temperature', '-') if first.get('teacher') else '-'} | "
                     f"{first.get('alpha', '-') if first.get('teacher') else '-'} | {len(rs)} | "
                     f"{test.mean():.2f} ± {sd(test):.2f} | {val.mean():.2f} ± {sd(val):.2f} | "
                     f"{100 * np.mean(tacc):.2f} | " if tacc else
                     f"| {name} | - | - | - | {len(rs)} | {test.mean():.2f} ± {sd(test):.2f} | "
                     f"{val.mean():.2f} ± {sd(val):.2f} | - | ")
        lines[-1] += (f"{np.mean(ent):.3f} |" if ent else "- |")
    return lines + [""]
