"""Benchmark rows into medians, ratios and target verdicts, written as text blocks, JSON, CSV and markdown."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.harness import Case

DASH = "—"


def stat(values: list[float]) -> dict[str, float] | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)} \
        if values else None


def summarize(case: Case, rows: list[dict]) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]
    keys = [m.key for m in case.metrics] + case.breakdown
    stats = {key: {arm: stat([r[key] for r in ok if r["arm"] == arm and isinstance(r.get(key), (int, float))])
                   for arm in case.arms} for key in keys}
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    for reference in [case.baseline, *case.also_vs]:
        ratios[reference] = {}
        for metric in case.metrics:
            if not metric.ratio:
                continue
            base = stats[metric.key][reference]
            ratios[reference][metric.key] = {
                arm: (s["median"] / base["median"] if s and base and base["median"] else None)
                for arm, s in stats[metric.key].items()}
    targets = []
    for target in case.targets:
        reference = target.reference or case.baseline
        value = ratios.get(reference, {}).get(target.key, {}).get(target.arm)
        met = None if value is None else (value >= target.limit if target.at_least else value <= target.limit)
        targets.append({"arm": target.arm, "metric": target.key, "reference": reference, "limit": target.limit,
                        "at_least": target.at_least, "ratio": value, "met": met, "note": target.note})
    failed = [{"arm": r["arm"], "repeat": r["repeat"], "error": r["error"]} for r in rows if "error" in r]
    return {"stats": stats, "ratios": ratios, "targets": targets, "failed": failed,
            "checks": case.checks(ok) if case.checks and ok else []}


def _cell(s: dict[str, float] | None, digits: int) -> str:
    if not s:
        return DASH
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def _table(header: list[str], body: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    return [indent + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in [header, *body]]


def target_text(case: Case, t: dict[str, Any]) -> str:
    metric = next(m.label for m in case.metrics if m.key == t["metric"])
    sign = "≥" if t["at_least"] else "≤"
    verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
    value = DASH if t["ratio"] is None else f"{t['ratio']:.3f}"
    note = f" ({t['note']})" if t["note"] else ""
    return (f"target: {case.arms[t['arm']]} {metric} {sign} {t['limit']:g} × {case.arms[t['reference']]}{note}: "
            f"{value} — {verdict}")


def text_block(case: Case, description: str, result: dict[str, Any], interrupted: bool = False) -> list[str]:
    stats, lines = result["stats"], []
    runs = max((s["n"] for per_arm in stats.values() for s in per_arm.values() if s), default=0)
    lines.append(f"{case.name} — {case.title}{' (INTERRUPTED: partial)' if interrupted else ''}")
    lines.append(f"  {description}; median [min–max] of {runs} run(s) per arm")
    header = ["arm", *(m.label for m in case.metrics)]
    body = [[label, *(_cell(stats[m.key][arm], m.digits) for m in case.metrics)] for arm, label in case.arms.items()]
    lines += _table(header, body)
    ratio_metrics = [m for m in case.metrics if m.ratio]
    body, seen = [], set()
    for reference, per_metric in result["ratios"].items():
        for arm in case.arms:
            if arm == reference or (reference, arm) in seen:
                continue
            seen.add((arm, reference))
            cells = [per_metric[m.key][arm] for m in ratio_metrics]
            body.append([f"{case.arms[arm]} ÷ {case.arms[reference]}",
                         *(DASH if c is None else f"{c:.3f}" for c in cells)])
    if body:
        lines += _table(["ratio of medians", *(m.label for m in ratio_metrics)], body)
    if case.breakdown:
        present = [key for key in case.breakdown if any(stats[key].values())]
        body = [[key.removeprefix("startup/").removesuffix("_s"),
                 *(DASH if not stats[key][arm] else f"{stats[key][arm]['median']:.2f}" for arm in case.arms)]
                for key in present]
        if body:
            lines.append("  breakdown, s (medians; the start-up phases sum to the first-step time; run_open, the "
                         "MLflow run opening while the workers start, overlaps them):")
            lines += _table(["phase", *case.arms.values()], body, indent="    ")
        else:
            lines.append("  breakdown: no phase figures recorded")
    lines += [f"  {line}" for line in result["checks"]]
    lines += [f"  {target_text(case, t)}" for t in result["targets"]]
    for failure in result["failed"]:
        lines.append(f"  FAILED {case.arms[failure['arm']]} run {failure['repeat']}: "
                     f"{failure['error'].splitlines()[0]}")
    if result["failed"]:
        lines += ["    " + line for line in result["failed"][0]["error"].splitlines()[1:]]
    return lines


def write_files(out: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """JSON at `out` (this run's cases merged over the cases an earlier run left there, each case carrying its
    own date and machine), and a CSV beside it: one row per case, arm, run and metric."""
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = {"cases": {}}
    if out.exists():
        try:
            merged = json.loads(out.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    merged.update({k: v for k, v in report.items() if k != "cases"})
    merged.setdefault("cases", {}).update(report["cases"])
    out.write_text(json.dumps(merged, indent=1))
    table = out.with_suffix(".csv")
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "arm", "repeat", "metric", "value", "date"])
        for name, case in merged["cases"].items():
            for row in case["rows"]:
                for key, value in row.items():
                    if key not in ("case", "arm", "repeat") and isinstance(value, (int, float)) \
                            and not isinstance(value, bool):
                        writer.writerow([name, row["arm"], row["repeat"], key, value, case["date"]])
    return out, table


def markdown(cases: dict[str, Any], machine_line: str, command: str) -> str:
    """A README-ready table of this run's cases, the date and machine on top."""
    out = [f"Measured {machine_line}", "", f"`{command}` — median [min–max] over runs; ratio: median ÷ median of "
                                         f"the case's baseline arm.", "",
           "| case | arm | metric | median [min–max] | ratio to baseline |", "|---|---|---|---|---|"]
    verdicts = []
    for name, case in cases.items():
        arms, baseline = case["arms"], case["baseline"]
        for arm, label in arms.items():
            for metric in (m for m in case["metrics"] if m.get("readme", True)):
                s = case["stats"][metric["key"]][arm]
                ratio = case["ratios"].get(baseline, {}).get(metric["key"], {}).get(arm)
                ratio_text = DASH if ratio is None else ("baseline" if arm == baseline else f"{ratio:.3f}")
                out.append(f"| {name} | {label} | {metric['label']} | {_cell(s, metric['digits'])} | {ratio_text} |")
        verdicts += [f"- {name}: {line.removeprefix('target: ')}" for line in case["target_lines"]]
    if verdicts:
        out += ["", "Targets (issue 7):", "", *verdicts]
    return "\n".join(out)
