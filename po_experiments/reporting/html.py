"""The sweep report as one static HTML page with its PNGs beside it: what a user on an air-gapped cluster opens.

`build_report(root, out)` aggregates the runs under `root` (Table 1, Fig. 4 panels, the paper's claims, the objectives'
table and G figure where runs of `experiment=objectives` have G), copies each run's figures
(win-rate curve, G curves) and shows a few outputs of the final model with the judge's verdicts. Every path is
relative, so the folder can be copied anywhere; a script on the page records how many images loaded.
"""
from __future__ import annotations

import datetime
import html
import json
import shutil
from pathlib import Path

import pandas as pd

from .aggregate import aggregate, find_runs, table1_cells
from .controller import html_table as controller_html
from .objectives import draw_objectives, headers, table_cells

RUN_FIGURES = ("win_rate", "G_components", "G_layers", "G_filtering", "G_by_target", "grad_norms",
               "ppo_advantages", "controller")
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{margin-bottom:.2em}.meta{color:#666}table{border-collapse:collapse;margin:1em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}.figs img{max-width:49%}
details{margin:.8em 0;border-top:1px solid #ddd;padding-top:.5em}summary{cursor:pointer;font-weight:600}
pre{white-space:pre-wrap;margin:0;font-size:12px;max-width:420px}"""
IMAGE_CHECK = """window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0);
  document.body.dataset.imagesLoaded = loaded.length;
  document.body.dataset.imagesTotal = images.length;
  document.getElementById("image-status").textContent = loaded.length + "/" + images.length + " images loaded";
});"""


def _img(src: str, alt: str) -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'


def table1_html(table: pd.DataFrame) -> str:
    parts = []
    for judge, rows in table.groupby("judge", sort=False):
        models = list(dict.fromkeys(rows["model"]))
        parts.append(f"<h3>Judge: {html.escape(str(judge))}</h3><table><tr><th>Method</th>"
                     + "".join(f"<th>{html.escape(m)} ours</th><th>{html.escape(m)} paper</th>" for m in models)
                     + "</tr>")
        for method, row in table1_cells(rows, models):
            cells = []
            for ours, case, paper in row:
                cells.append(html.escape(ours) + (f"<br><small>{html.escape(case)}</small>" if case else ""))
                cells.append(html.escape(paper))
            parts.append(f"<tr><td>{html.escape(method)}</td>"
                         + "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def objectives_html(table: pd.DataFrame) -> str:
    """The objectives' table (objectives.csv): per judge and model, one row per objective."""
    extras = [c[2:-5] for c in table.columns if c.startswith("G_") and c.endswith("_mean")
              and c[2:-5] not in ("TOT", "POS", "NEG")]
    parts = []
    for (judge, model), rows in table.groupby(["judge", "model"], sort=False):
        parts.append(f"<h3>{html.escape(str(model))}, judge: {html.escape(str(judge))}</h3><table><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in headers(extras)) + "</tr>")
        for _, row in rows.iterrows():
            cells = table_cells(row, extras)
            parts.append(f"<tr><td>{html.escape(cells[0])}</td>"
                         + "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells[1:]) + "</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def claims_html(table: pd.DataFrame) -> str:
    """The paper's claims (claims.csv): per model, one row per claim with its verdict."""
    parts = []
    for model, rows in table.groupby("model", sort=False):
        parts.append(f"<h3>{html.escape(str(model))}</h3><table><tr><th>Claim</th><th>Paper</th><th>Verdict</th>"
                     "<th>Measured</th><th>Rule</th></tr>")
        for row in rows.fillna("").itertuples():
            parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
                row.claim, f"{row.source}: {row.statement}", row.verdict, row.measured, row.rule)) + "</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def targets_html(written: dict) -> list[str]:
    """G against several targets (reporting/targets.py): the first-order check's correlations and where the
    attribution lists are."""
    if "targets_correlation.csv" not in written:
        return []
    table = pd.read_csv(written["targets_correlation.csv"])
    head = ["scope", "model", "family", "method", "seed", "pearson_r", "n_points", "sign_agreement"]
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(round(v, 3) if isinstance(v, float) else v))}</td>"
                                    for v in (r[h] for h in head)) + "</tr>" for _, r in table.iterrows())
    links = " ".join(f'<a href="{html.escape(n)}">{html.escape(n)}</a>' for n in written
                     if n.startswith("G_by_target_") or n == "attribution.md")
    return ["<h2>G against several targets: first-order prediction vs measured log-likelihood change</h2>",
            "<p>Pearson r between G_TOT(target, checkpoint) x steps to the next checkpoint and the measured change of "
            f"the target's mean log-likelihood, over checkpoints x targets. {links}</p>",
            "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{rows}</table>"]


def samples_html(run_dir: Path, judge: str, step: int, n: int) -> str:
    path = run_dir / "eval" / judge / f"step-{step}.json"
    if not path.exists():
        return ""
    verdicts = json.loads(path.read_text())[:n]
    rows = "".join(f"<tr><td><pre>{html.escape(v['instruction'])}</pre></td><td><pre>{html.escape(v['output_1'])}"
                   f"</pre></td><td><pre>{html.escape(v['output_2'])}</pre></td>"
                   f"<td class=num>{v['preference'] if v['preference'] is not None else 'unparsed'}</td></tr>"
                   for v in verdicts)
    return (f"<p>Final model (step {step}) vs SFT, judge {html.escape(judge)} (preference 2 = policy wins, "
            f"1 = SFT wins, 1.5 = tie):</p><table><tr><th>instruction</th><th>SFT</th><th>policy</th>"
            f"<th>preference</th></tr>{rows}</table>")


def run_section(run, root: Path, out: Path, n_samples: int, *, expanded: bool = False) -> str:
    s = run.summary
    name = str(run.dir.relative_to(root)) if run.dir.is_relative_to(root) else run.dir.name
    folder = out / "runs" / name.replace("/", "__")
    figures = []
    for stem in RUN_FIGURES:
        source = run.dir / "figures" / f"{stem}.png"
        if source.exists():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / source.name)
            figures.append(_img(str((folder / source.name).relative_to(out)), f"{name}: {stem}"))
    final = run.win_rates[run.win_rates["judge"] == s.get("judge")] if not run.win_rates.empty else run.win_rates
    wr = f"{s['win_rate']:.1f} ± {s['win_rate_se']:.1f}" if s.get("win_rate") is not None else "—"
    samples = samples_html(run.dir, s["judge"], int(final["step"].max()), n_samples) if len(final) else ""
    return (f"<details{' open' if expanded else ''}><summary>{html.escape(s['method'])} · {html.escape(str(s['model']))} · seed {s['seed']} — "
            f"win rate {wr} ({html.escape(str(s.get('judge')))})</summary><p class=meta>{html.escape(name)}; "
            f"final step {s.get('final_step')}, wall time {s.get('wall_time_s')} s</p>"
            f"<div class=figs>{''.join(figures)}</div>{samples}</details>")


def build_report(root: Path, out: Path, *, title: str | None = None, n_samples: int = 5) -> Path:
    root, out = Path(root).resolve(), Path(out).resolve()
    written = aggregate(root, out)
    written.update(draw_objectives(root, out))
    table = pd.read_csv(written["table1.csv"])
    objectives = ["<h2>Objectives: final win rate vs SFT and the final checkpoint's G (mean ± std over seeds)</h2>",
                  objectives_html(pd.read_csv(written["objectives.csv"]))] if "objectives.csv" in written else []
    claims = ["<h2>The paper's claims: held / not held / not measurable at this scale</h2>",
              claims_html(pd.read_csv(written["claims.csv"]))] if "claims.csv" in written else []
    controller = ["<h2>Closed-loop controller vs DPO and the cDPO cases (mean ± std over seeds)</h2>",
                  controller_html(pd.read_csv(written["controller.csv"]))] if "controller.csv" in written else []
    runs = find_runs(root)
    figures = "".join(_img(p.name, p.stem) for name, p in written.items() if name.endswith(".png"))
    body = [f"<h1>{html.escape(title or root.name)}</h1>",
            f"<p class=meta>{len(runs)} runs under {html.escape(str(root))}; built "
            f"{datetime.datetime.now():%Y-%m-%d %H:%M}; <span id=image-status>images loading</span></p>",
            "<h2>Table 1: final win rate vs SFT (mean ± std over seeds of the best case), beside the paper's</h2>",
            table1_html(table), *objectives, *claims, *controller, *targets_html(written),
            "<h2>Figures</h2>", f"<div>{figures}</div>",
            "<h2>Runs</h2>", *(run_section(r, root, out, n_samples, expanded=i == 0) for i, r in enumerate(runs))]
    page = out / "index.html"
    page.write_text(f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title or root.name)}"
                    f"</title><style>{STYLE}</style></head><body>{''.join(body)}<script>{IMAGE_CHECK}</script>"
                    f"</body></html>")
    return page
