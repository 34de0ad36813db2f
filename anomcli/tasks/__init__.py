"""One thin `run(cfg) -> result` per subcommand; `anomcli.cli` composes the config and calls it."""

TASKS = {
    "train": "learn what a good surface looks like from defect-free images; writes a checkpoint",
    "validate": "score a labelled test split; writes metrics.json, scores.csv and heatmaps",
    "threshold": "choose the operating point (target recall, target FPR or best F1); writes threshold.json",
    "infer": "score every image under a folder; writes predictions.jsonl and heatmaps",
    "export": "write the scoring model (maps and scores) as an ONNX graph with a dynamic batch",
}
