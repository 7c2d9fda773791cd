"""Bench results as rows (ratio to bound and to naive), checked targets, a table and a plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib import pyplot as plt
from rich.console import Console
from rich.table import Table

from avindex.bench.towers import at_batch

# Targets (issue: decode only what clips need, on every decoder the machine has).
EMBED_VS_DECODE_ALL = 1.0  # PyAV embed >= 1.0 x PyAV decode-all on the same files
EMBED_VS_SKIP = 0.8  # PyAV embed >= 0.8 x PyAV skip-non-reference decode
EMBED_VS_NVDEC = 0.8  # NVDEC embed >= 0.8 x multi-session NVDEC decode-all
EMBED_MIN_RATE = {1080: 90.0, 720: 250.0}  # NVDEC embed video s/s by frame height (H200)
NVDEC_UTILISATION = 85.0  # percent, sampled during embed
TRAIN_PAIRS = 3000.0  # full-width training pairs/s on the GPU
EMBED_VS_NAIVE = 3.0  # embed >= 3 x the naive pipeline
SEARCH_OVERHEAD = 0.10  # search <= 10% slower than raw faiss
TRAIN_WAIT = 0.10  # training waits for data < 10% of step time


@dataclass
class Row:
    """One measured rate with its comparisons: value / bound and value / naive baseline."""

    stage: str
    what: str
    value: float
    unit: str
    bound: float | None = None
    bound_name: str = ""
    naive: float | None = None
    naive_name: str = ""
    note: str = ""

    @property
    def vs_bound(self) -> float | None:
        """Measured rate over its bound."""
        return self.value / self.bound if self.bound else None

    @property
    def vs_naive(self) -> float | None:
        """Measured rate over the naive baseline's."""
        return self.value / self.naive if self.naive else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, ratios included."""
        return {**asdict(self), "vs_bound": self.vs_bound, "vs_naive": self.vs_naive}


@dataclass
class Target:
    """A target from the issue, the measured value, and the stage to blame when it is missed."""

    name: str
    measured: float
    threshold: float
    higher_is_better: bool
    bottleneck: str | None = None

    @property
    def met(self) -> bool:
        """Whether the measured value is on the right side of the threshold."""
        if self.higher_is_better:
            return self.measured >= self.threshold
        return self.measured <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, `met` included; the bottleneck only when the target is missed."""
        out = {**asdict(self), "met": self.met}
        if self.met:
            out["bottleneck"] = None
        return out


def embed_bottleneck(embed: dict[str, Any], model_bound: float) -> str:
    """The stage that held the embed run back, from the consumer's time split."""
    fractions = embed["stage_fraction"]
    blame = {
        "wait": "decode (the model waited for decoded clips)",
        "preprocess": "preprocess (DALI crops and spectrograms)",
        "model": "model",
        "write": "write (HDF5 shards)",
    }
    stage = max(blame, key=lambda k: fractions.get(k, 0.0))
    text = f"{blame[stage]}: {100 * fractions.get(stage, 0.0):.0f}% of wall time"
    model_s = embed["stage_seconds"].get("model", 0.0)
    if stage == "model" and model_s:
        in_run = embed["clips"] / model_s
        text += f"; the towers ran at {in_run:.1f} clips/s in the run vs {model_bound:.1f} alone"
    return text


def embed_decoder(embed: dict[str, Any]) -> str:
    """The decoder that served most of the embedded videos ('pyav' when none is recorded)."""
    decoders = embed.get("decoders") or {"pyav": 1}
    return max(decoders, key=decoders.get)


def _decode_rows(stages: dict[str, Any], rows: list[Row]) -> None:
    """PyAV bounds, avindex's decode stage, and on CUDA the NVDEC sweep, limit and DALI."""
    if decode := stages.get("decode"):
        everything, skip, ours = decode["decode_all"], decode["skip_nonref"], decode["avindex"]
        layout = f"{everything['processes']} proc x {everything['threads']} threads"
        rows.append(
            Row(
                "decode",
                f"PyAV decode-all ({layout})",
                everything["video_s_per_s"],
                "video s/s",
                note=f"{everything['frames_per_s']:.0f} frames/s, with audio",
            )
        )
        rows.append(
            Row(
                "decode",
                "PyAV skip non-reference (NONREF)",
                skip["video_s_per_s"],
                "video s/s",
                naive=everything["video_s_per_s"],
                naive_name="decode-all",
                note=f"{skip['frames']} of {everything['frames']} frames decoded",
            )
        )
        rows.append(
            Row(
                "decode",
                f"avindex decode ({ours['workers']} workers x {ours['threads']} threads)",
                ours["video_s_per_s"],
                "video s/s",
                bound=skip["video_s_per_s"],
                bound_name="skip-non-reference",
                naive=everything["video_s_per_s"],
                naive_name="decode-all",
                note=f"{100 * ours['decoded_fraction']:.0f}% of frames decoded; clips only",
            )
        )
    if nvdec := stages.get("nvdec"):
        limit = nvdec["physical_video_s_per_s"]
        for point in nvdec["sweep"]:
            rows.append(
                Row(
                    "nvdec",
                    f"NVDEC decode-all, {point['sessions']} sessions",
                    point["video_s_per_s"],
                    "video s/s",
                    bound=limit,
                    bound_name="physical limit",
                    note=f"{point['frames_per_s']:.0f} frames/s ({nvdec['codec']} {nvdec['size']})",
                )
            )
        skip = nvdec["skip"]
        rows.append(
            Row(
                "nvdec",
                f"NVDEC skip non-reference, {skip['sessions']} sessions",
                skip["video_s_per_s"],
                "video s/s",
                naive=nvdec["best"]["video_s_per_s"],
                naive_name="decode-all",
                note=f"{100 * skip['submitted_fraction']:.0f}% of packets submitted",
            )
        )
        rows.append(
            Row(
                "nvdec",
                f"NVDEC physical limit ({nvdec['engines']} engines)",
                limit,
                "video s/s",
                note=f"{nvdec['per_engine_frames_per_s']:.0f} frames/s per busy engine (best seen)",
            )
        )
    if dali := stages.get("dali"):
        best = nvdec["best"]["video_s_per_s"] if nvdec else None
        rows.append(
            Row(
                "nvdec",
                f"DALI fn.decoders.video, {dali['batch']} videos per call",
                dali["video_s_per_s"],
                "video s/s",
                bound=best,
                bound_name="best NVDEC sessions",
                note=f"{dali['frames_per_s']:.0f} frames/s",
            )
        )


def _embed_rows(
    stages: dict[str, Any], corpus: dict[str, Any], rows: list[Row], targets: list[Target]
) -> None:
    """Embed against the decode bound of the decoder it used, and the naive pipeline."""
    embed, decode, model, naive = (stages.get(k) for k in ("embed", "decode", "model", "naive"))
    nvdec = stages.get("nvdec")
    if not embed:
        return
    model_bound = at_batch(model, embed["batch_size"])["clips_per_s"] if model else 0.0
    blame = embed_bottleneck(embed, model_bound)
    rate, decoder = embed["video_s_per_s"], embed_decoder(embed)
    split = ", ".join(f"{k} {100 * v:.0f}%" for k, v in embed["stage_fraction"].items())
    used = ", ".join(f"{k} {v}" for k, v in sorted(embed.get("decoders", {}).items()))
    note = f"{embed['clips_per_s']:.1f} clips/s; decoders: {used}; time: {split}"
    bound, bound_name = None, ""
    if decoder == "nvdec" and nvdec:
        bound = nvdec["best"]["video_s_per_s"]
        bound_name = f"NVDEC decode-all ({nvdec['best']['sessions']} sessions)"
    elif decoder == "pyav" and decode:
        bound, bound_name = decode["decode_all"]["video_s_per_s"], "PyAV decode-all"
    naive_rate = naive.get("video_s_per_s") if naive else None
    rows.append(
        Row(
            "embed",
            "embed end to end",
            rate,
            "video s/s",
            bound=bound,
            bound_name=bound_name,
            naive=naive_rate,
            naive_name="naive pipeline",
            note=note,
        )
    )
    if model_bound:
        hop = embed.get("hop", 1.0)
        rows.append(Row("embed", "model bound (towers alone)", model_bound * hop, "video s/s"))
    if naive_rate:
        rows.append(Row("embed", "naive pipeline (openl3-style)", naive_rate, "video s/s"))
    if decoder == "pyav" and decode:
        for name, key, threshold in (
            ("decode-all", "decode_all", EMBED_VS_DECODE_ALL),
            ("skip-non-reference", "skip_nonref", EMBED_VS_SKIP),
        ):
            ratio = rate / decode[key]["video_s_per_s"]
            targets.append(
                Target(f"embed >= {threshold:g} x PyAV {name}", ratio, threshold, True, blame)
            )
    if decoder == "nvdec" and nvdec:
        targets.append(
            Target(
                f"embed >= {EMBED_VS_NVDEC:g} x NVDEC decode-all (best sessions)",
                rate / nvdec["best"]["video_s_per_s"],
                EMBED_VS_NVDEC,
                True,
                blame,
            )
        )
        height = min(int(s.split("x")[1]) for s in corpus.get("sizes", ["0x0"]))
        floor = EMBED_MIN_RATE.get(height)
        if floor:
            targets.append(
                Target(f"embed {height}p >= {floor:g} video s/s", rate, floor, True, blame)
            )
        if embed.get("nvdec_utilisation") is not None:
            targets.append(
                Target(
                    f"NVDEC utilisation during embed >= {NVDEC_UTILISATION:g}%",
                    embed["nvdec_utilisation"],
                    NVDEC_UTILISATION,
                    True,
                    f"sessions starved ({embed['nvdec_sessions']} in flight): {blame}",
                )
            )
    if naive_rate:
        targets.append(
            Target(
                f"embed >= {EMBED_VS_NAIVE:g} x naive",
                rate / naive_rate,
                EMBED_VS_NAIVE,
                True,
                blame,
            )
        )


def _search_rows(index: dict[str, Any], rows: list[Row], targets: list[Target]) -> None:
    """Index build and search rates against raw faiss on the same vectors."""
    recall = f"recall@10 {index['recall_at_10']:.3f} (raw {index['raw_recall_at_10']:.3f})"
    what = f"{index['factory']} {index['params'] or ''}".strip()
    rows.append(
        Row(
            "index",
            f"build {index['vectors']} x {index['dim']}",
            index["build_vectors_per_s"],
            "vectors/s",
            bound=index["raw_build_vectors_per_s"],
            bound_name="raw faiss build",
            note=f"{what}; avindex also measures recall and tunes nprobe",
        )
    )
    for mode, label in (
        ("batch", f"{index['queries']} queries per call"),
        ("single", "1 query per call"),
    ):
        ours, raw = index[f"{mode}_queries_per_s"], index[f"raw_{mode}_queries_per_s"]
        rows.append(Row("search", label, ours, "queries/s", raw, "raw faiss", note=recall))
        overhead = raw / ours - 1.0
        targets.append(
            Target(
                f"search overhead <= {100 * SEARCH_OVERHEAD:.0f}% ({mode})",
                overhead,
                SEARCH_OVERHEAD,
                False,
                "avindex's query checks and normalisation around faiss",
            )
        )


def assess(
    stages: dict[str, Any], corpus: dict[str, Any] | None = None
) -> tuple[list[Row], list[Target]]:
    """Rows and checked targets for whatever stages were measured."""
    rows: list[Row] = []
    targets: list[Target] = []
    stages = {n: e for n, e in stages.items() if "error" not in e and "skipped" not in e}
    _decode_rows(stages, rows)
    if front := stages.get("frontend"):
        rows.append(
            Row(
                "frontend",
                f"DALI spectrograms ({front['device']}, batch {front['batch']})",
                front["dali_spectrograms_per_s"],
                "spectrograms/s",
                naive=front["numpy_spectrograms_per_s"],
                naive_name="numpy STFT",
                note=f"max |dB diff| {front['max_abs_db_difference']:.2g} on loud bins",
            )
        )
    if model := stages.get("model"):
        single = min(model["sweep"], key=lambda e: e["batch"])
        for entry in model["sweep"]:
            rows.append(
                Row(
                    "model",
                    f"both towers, batch {entry['batch']}",
                    entry["clips_per_s"],
                    "clips/s",
                    naive=single["clips_per_s"],
                    naive_name=f"batch {single['batch']}",
                    note=(
                        f"visual {entry['visual_clips_per_s']:.1f}, "
                        f"audio {entry['audio_clips_per_s']:.1f} clips/s "
                        f"({model['torch_threads']} torch threads); embed's way "
                        f"(a thread per tower) {entry['embed_way_clips_per_s']:.1f}; "
                        f"{model['precision']}"
                    ),
                )
            )
    _embed_rows(stages, corpus or {}, rows, targets)
    if train := stages.get("train"):
        rows.append(
            Row(
                "train",
                f"train (batch {train['batch_size']}, width {train['width']:g})",
                train["pairs_per_s"],
                "pairs/s",
                bound=train["compute_pairs_per_s"],
                bound_name="compute only",
                note=f"data wait {100 * train['data_wait_fraction']:.1f}% of step time",
            )
        )
        if train.get("device") == "cuda" and train["width"] >= 1.0:
            targets.append(
                Target(
                    f"full-width training >= {TRAIN_PAIRS:g} pairs/s",
                    train["pairs_per_s"],
                    TRAIN_PAIRS,
                    True,
                    f"data wait {100 * train['data_wait_fraction']:.0f}% of step time",
                )
            )
        targets.append(
            Target(
                f"training data wait < {100 * TRAIN_WAIT:.0f}%",
                train["data_wait_fraction"],
                TRAIN_WAIT,
                False,
                "data: decoding and preprocessing pairs (PairStream) cannot keep up",
            )
        )
    if index := stages.get("index"):
        _search_rows(index, rows, targets)
    return rows, targets


def _fmt(x: float | None) -> str:
    """Compact number for the table."""
    if x is None:
        return ""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def print_table(result: dict[str, Any]) -> None:
    """The rows and the targets as rich tables on stdout."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # piped into a file: keep rows on one line
    table = Table("stage", "measured", "rate", "unit", "vs bound", "vs naive", "note")
    for r in result["rows"]:
        vs_bound = f"{r['vs_bound']:.2f} x {r['bound_name']}" if r["vs_bound"] else ""
        vs_naive = f"{r['vs_naive']:.2f} x {r['naive_name']}" if r["vs_naive"] else ""
        table.add_row(
            r["stage"], r["what"], _fmt(r["value"]), r["unit"], vs_bound, vs_naive, r["note"]
        )
    console.print(table)
    targets = Table("target", "measured", "status", "bottleneck when missed")
    for t in result["targets"]:
        status = "[green]met[/green]" if t["met"] else "[red]missed[/red]"
        targets.add_row(t["name"], f"{t['measured']:.3g}", status, t["bottleneck"] or "")
    if result["targets"]:
        console.print(targets)
    for name, stage in result["stages"].items():
        if "error" in stage:
            console.print(f"[red]{name} not measured[/red]: {stage['error']}", highlight=False)
        elif "skipped" in stage:
            console.print(f"{name} not measured: {stage['skipped']}", highlight=False)
    m = result["machine"]
    console.print(
        f"{m['cpu']} ({m['cpu_count']} cores{', ' + m['gpu'] if m.get('gpu') else ''}), "
        f"load {m['load_average']}, {result['date']}, {result['elapsed_seconds']:.0f} s",
        highlight=False,
    )


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """The whole result as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def write_plot(result: dict[str, Any], path: str | Path) -> None:
    """A PNG: rates in video s/s, embed's time split, the model batch sweep, targets."""
    matplotlib.use("Agg")
    fig, axes = plt.subplots(2, 3, figsize=(19, 8))
    _plot_rates(axes[0][0], result)
    _plot_split(axes[0][1], result)
    _plot_nvdec(axes[0][2], result)
    _plot_sweep(axes[1][0], result)
    _plot_targets(axes[1][1], result)
    axes[1][2].axis("off")
    m = result["machine"]
    fig.suptitle(
        f"avindex bench: {m['cpu']} ({m['cpu_count']} cores), {result['date']}", fontsize=10
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_rates(ax: Any, result: dict[str, Any]) -> None:
    """Bars of every rate measured in seconds of video per second."""
    rows = [r for r in result["rows"] if r["unit"] == "video s/s"]
    bounds = {r["bound_name"]: r["bound"] for r in rows if r["bound"]}
    labels = [r["what"] for r in rows] + list(bounds)
    values = [r["value"] for r in rows] + list(bounds.values())
    ax.barh(labels, values, color=["C0"] * len(rows) + ["C7"] * len(bounds))
    ax.set_xscale("log")
    if values:
        ax.set_xlim(left=min(values) / 2)  # log-scale bars need a visible base
    ax.set_xlabel("seconds of video per second (log)")
    ax.set_title("throughput (grey: bounds)")


def _plot_split(ax: Any, result: dict[str, Any]) -> None:
    """embed's consumer time split by stage."""
    embed = result["stages"].get("embed")
    ax.set_title("embed: where the wall time went")
    if not embed:
        ax.axis("off")
        return
    split = {k: v for k, v in embed["stage_fraction"].items() if k != "decode"}
    split["other"] = max(0.0, 1.0 - sum(split.values()))
    left = 0.0
    for i, (name, frac) in enumerate(split.items()):
        ax.barh(["embed"], [frac], left=left, color=f"C{i}", label=f"{name} {100 * frac:.0f}%")
        left += frac
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("fraction of wall time (decode runs alongside, in background workers)")


def _plot_sweep(ax: Any, result: dict[str, Any]) -> None:
    """Clips/s per tower against batch size."""
    model = result["stages"].get("model")
    ax.set_title("model bound: clips/s by batch size")
    if not model:
        ax.axis("off")
        return
    batches = [e["batch"] for e in model["sweep"]]
    for key, label in (("visual", "visual"), ("audio", "audio"), ("", "both")):
        ys = [e[f"{key}_clips_per_s" if key else "clips_per_s"] for e in model["sweep"]]
        ax.plot(batches, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("clips/s")
    ax.legend(fontsize=8)


def _plot_nvdec(ax: Any, result: dict[str, Any]) -> None:
    """NVDEC decode-all rate against sessions in flight, with the physical limit."""
    nvdec = result["stages"].get("nvdec")
    ax.set_title("NVDEC decode-all: sessions in flight")
    if not nvdec or "sweep" not in nvdec:
        ax.text(0.5, 0.5, "not measured\n(needs CUDA + PyNvVideoCodec)", ha="center", va="center")
        ax.axis("off")
        return
    sessions = [p["sessions"] for p in nvdec["sweep"]]
    ax.plot(sessions, [p["video_s_per_s"] for p in nvdec["sweep"]], marker="o", label="decode-all")
    ax.axhline(nvdec["physical_video_s_per_s"], color="C7", ls="--", label="physical limit")
    skip = nvdec["skip"]
    ax.plot([skip["sessions"]], [skip["video_s_per_s"]], "s", color="C2", label="skip non-ref")
    embed = result["stages"].get("embed")
    if embed and embed.get("decoders", {}).get("nvdec"):
        ax.plot([embed["nvdec_sessions"]], [embed["video_s_per_s"]], "*", ms=12, label="embed")
    ax.set_xlabel("sessions")
    ax.set_ylabel("video s/s")
    ax.legend(fontsize=8)


def _plot_targets(ax: Any, result: dict[str, Any]) -> None:
    """Each target's measured value over its threshold (>= 1 is met)."""
    ax.set_title("targets: measured / threshold (>= 1 met)")
    targets = result["targets"]
    if not targets:
        ax.axis("off")
        return
    scores = []
    for t in targets:
        if t["higher_is_better"]:
            scores.append(t["measured"] / t["threshold"])
        else:  # lower is better: threshold / measured, capped so a zero does not explode
            scores.append(min(10.0, t["threshold"] / max(t["measured"], 1e-3)))
    colors = ["C2" if t["met"] else "C3" for t in targets]
    ax.barh([t["name"] for t in targets], scores, color=colors)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xscale("log")
