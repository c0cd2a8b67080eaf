"""A W&B report for a sweep (online only): the runs of one experiment (W&B group), grouped by method.

Panels: the win rate over checkpoints (mean ± std over seeds), G of every component over checkpoints, the
final win rates, and the sample-output tables with verdicts. Offline, `html.build_report` gives the same.
"""
from __future__ import annotations


def build_wandb_report(*, project: str, entity: str | None, group: str, title: str | None = None) -> str:
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(entity=entity or "", project=project, name=group, filters=f"Group = '{group}'",
                       groupby=["method"])
    components = ["TOT", "POS", "NEG", "TOP", "MID", "BOT"]
    panels = [
        wr.LinePlot(title="win rate vs SFT (%)", x="eval/step", y=["eval/win_rate"], groupby_aggfunc="mean",
                    groupby_rangefunc="stddev", layout=wr.Layout(x=0, y=0, w=12, h=8)),
        wr.LinePlot(title="G (all layers)", x="alignment/step", y=[f"alignment/G/{c}" for c in components],
                    layout=wr.Layout(x=12, y=0, w=12, h=8)),
        wr.BarPlot(title="final win rate", metrics=["final/win_rate"], groupby_aggfunc="mean",
                   groupby_rangefunc="stddev", layout=wr.Layout(x=0, y=8, w=12, h=8)),
        wr.WeavePanelSummaryTable("eval/samples", layout=wr.Layout(x=12, y=8, w=12, h=8)),
    ]
    report = wr.Report(project=project, entity=entity or "", title=title or f"po-experiments: {group}",
                       description="Win rates (AlpacaEval protocol) and gradient alignment G per method.",
                       blocks=[wr.H1(f"Sweep {group}"), wr.PanelGrid(runsets=[runset], panels=panels)])
    report.save()
    return report.url
