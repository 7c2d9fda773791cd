"""Typer CLI: one thin command per stage; heavy imports happen inside the commands."""

from __future__ import annotations

import logging
import sys

import typer

from avindex.errors import AvindexError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train L3-Net on your videos, embed every second, index with faiss, search across "
    "modalities.",
)


class _WarningLines(logging.Handler):
    """Library warnings (loggers `avindex.*`, e.g. unreadable shards) as one line each on stderr,
    each message once per command (a store opened twice in one command would repeat them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = " ".join(record.getMessage().split())
        if message not in self.seen:
            self.seen.add(message)
            print(f"avindex: warning: {message}", file=sys.stderr)


def _show_warnings() -> None:
    """Install the warning printer once (main() may run more than once in one process)."""
    logger = logging.getLogger("avindex")
    for handler in logger.handlers:
        if isinstance(handler, _WarningLines):
            handler.seen.clear()
            return
    logger.addHandler(_WarningLines())


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2; library
    warnings one line each (`avindex: warning: ...`)."""
    _show_warnings()
    try:
        app()
    except AvindexError as exc:
        print(f"avindex: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("avindex: interrupted", file=sys.stderr)
        sys.exit(130)


@app.command()
def probe(
    paths: list[str] = typer.Argument(..., help="Media files or folders (searched recursively)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list of dicts instead."),
    workers: int = typer.Option(None, help="Probing processes (default: as embed's decoders)."),
) -> None:
    """Describe media files, or say in one line why each cannot be used.

    Example: avindex probe videos/ clip.mp4 --json
    """
    import json

    from avindex.config import EmbedConfig
    from avindex.media import MediaInfo, probe_files
    from avindex.scan import scan_inputs

    found = scan_inputs(paths)
    infos = probe_files(found.paths, workers or EmbedConfig().decode_workers)
    infos += [MediaInfo(p, error="no such file or folder") for p in found.missing]
    if json_out:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        raise typer.Exit(1 if found.missing else 0)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table("file", "container", "duration", "video", "fps", "audio")
    for i in (i for i in infos if i.usable):
        rotation = f" rot {i.rotation}" if i.rotation else ""
        fps = f"{i.avg_fps:g}" + (" VFR" if i.variable_fps else "")
        audio = f"{i.audio_codec} {i.sample_rate} Hz {i.channels} ch" if i.audio_codec else "none"
        video = f"{i.video_codec} {i.width}x{i.height}{rotation}"
        table.add_row(_short(i.path), i.container, f"{i.duration:.2f} s", video, fps, audio)
    console.print(table)
    bad = [i for i in infos if not i.usable]
    for i in bad:
        console.print(f"[red]unusable[/red] {_short(i.path)}: {i.error}", highlight=False)
    for i in infos:
        for warning in i.warnings:
            console.print(f"[yellow]note[/yellow] {_short(i.path)}: {warning}", highlight=False)
    console.print(f"{len(infos)} files, {len(infos) - len(bad)} usable, {len(bad)} unusable")
    if found.missing:
        raise typer.Exit(1)  # the report is complete; a mistyped path must not pass unnoticed


def _short(path: str) -> str:
    """Path relative to the working directory when that is shorter (for tables)."""
    import os

    rel = os.path.relpath(path)
    return rel if len(rel) < len(path) else path


def _size(size: str | None) -> tuple[int | None, int | None]:
    """--size WxH -> (width, height); (None, None) when not given."""
    if size is None:
        return None, None
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise AvindexError(f"--size {size!r}: expected WxH, e.g. 128x96") from None
    return width, height


@app.command()
def synth(
    out: str = typer.Argument(..., help="Folder to write the corpus into."),
    videos: int = typer.Option(None, help="Number of videos."),
    seconds: int = typer.Option(None, help="Length of each video in whole seconds."),
    classes: int = typer.Option(None, help="Number of audio-visual event classes."),
    seed: int = typer.Option(None, help="Random seed (same seed, same corpus)."),
    fmt: str = typer.Option(None, "--format", help="mp4 (H.264+AAC) or webm (VP9+Opus)."),
    size: str = typer.Option(None, help="Frame size WxH, e.g. 128x96."),
    fps: float = typer.Option(None, help="Frames per second."),
    natural: bool = typer.Option(
        False, help="Natural-looking benchmark videos (texture, camera motion; no labels)."
    ),
    codec: str = typer.Option(None, help="With --natural: h264 or hevc (encoder defaults)."),
    loops: int = typer.Option(
        None, help="With --natural: each video is --seconds encoded, played this many times."
    ),
    difficulty: str = typer.Option(
        None,
        help="easy (large object, plain backdrop, clean sound), hard (small object crossing a "
        "textured scene, its sound at a random SNR in ambient noise, a distractor sound) or "
        "harder (smaller, quieter).",
    ),
    one_class_per_video: bool = typer.Option(
        None,
        "--one-class-per-video",
        help="Video i shows class i % classes throughout (every video its own picture and sound "
        "when classes >= videos).",
    ),
) -> None:
    """Write a synthetic audio-visual corpus with per-second class labels (labels.csv).

    Example: avindex synth corpus/ --videos 40 --seconds 20 --classes 10 --seed 0
    """
    import time

    from avindex.config import SynthConfig, replace
    from avindex.synth import make_corpus

    width, height = _size(size)
    if natural:
        from avindex.config import NaturalConfig
        from avindex.natural import make_natural_corpus

        ncfg = replace(
            NaturalConfig(),
            videos=videos,
            seconds=seconds,
            seed=seed,
            width=width,
            height=height,
            fps=fps,
            codec=codec,
            loops=loops,
        )
        start = time.perf_counter()
        made = make_natural_corpus(out, ncfg)
        print(
            f"wrote {len(made)} natural videos ({ncfg.seconds * ncfg.loops} s, "
            f"{ncfg.width}x{ncfg.height}, "
            f"{ncfg.codec}) in {time.perf_counter() - start:.1f} s"
        )
        return
    cfg = replace(
        SynthConfig(),
        videos=videos,
        seconds=seconds,
        classes=classes,
        seed=seed,
        format=fmt,
        width=width,
        height=height,
        fps=fps,
        difficulty=difficulty,
        one_class_per_video=one_class_per_video,
    )
    start = time.perf_counter()
    labels = make_corpus(out, cfg)
    print(
        f"wrote {cfg.videos} {cfg.difficulty} videos ({cfg.seconds} s, {cfg.classes} classes, "
        f"{cfg.format}) and "
        f"{labels} in {time.perf_counter() - start:.1f} s"
    )


@app.command()
def index(
    store: str = typer.Argument(..., help="Store directory written by `avindex embed`."),
    modality: str = typer.Option("both", help="visual, audio or both."),
    factory: str = typer.Option(
        None, help="auto (by size and memory) or a faiss factory string, e.g. 'IVF1024,Flat'."
    ),
    max_memory: str = typer.Option(None, "--max-memory", help="Index memory budget, e.g. 4G."),
    device: str = typer.Option(None, help="auto, cpu or cuda (faiss GPU when it sees one)."),
    update: bool = typer.Option(False, "--update", help="Add only shards not yet indexed."),
    parts: int = typer.Option(
        None, min=1, help="Runs of shards added in parallel, then merged on disk (auto by size)."
    ),
    workers: int = typer.Option(None, min=1, help="Processes adding parts at once (all cores)."),
    rerank: int = typer.Option(
        None, min=0, help="PQ indexes: re-rank k x this many candidates exactly (0: off)."
    ),
    ray: bool = typer.Option(
        False, "--ray", help="Add parts as Ray tasks (RAY_ADDRESS or a local Ray; extra 'dist')."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print index.json instead of a table."),
) -> None:
    """Build (or --update) the faiss index of each modality and print its measured recall@10.

    Example: avindex index store/ --max-memory 4G
    An index lock makes a second `avindex index` on the same store fail at once.
    """
    import json

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from avindex.config import IndexConfig, replace
    from avindex.index import build_index, parse_size, update_index

    cfg = replace(
        IndexConfig(),
        factory=factory,
        max_memory=parse_size(max_memory) if max_memory is not None else None,
        device=device,
        parts=parts,
        workers=workers,
        rerank=rerank,
    )
    runner = None
    if ray:
        try:
            from avindex.index_ray import RayRunner
        except ImportError:
            raise AvindexError("--ray: Ray is not installed; pip install 'avindex[dist]'") from None
        runner = RayRunner()
    err = Console(stderr=True)
    with Progress(console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"indexing {name}", total=total)
            bar.update(tasks[name], completed=done)

        run = update_index if update else build_index
        info = run(store, cfg, modality=modality, progress=progress, runner=runner)
    if json_out:
        print(json.dumps(info, indent=2))
        return
    key = f"recall_at_{cfg.recall_k}"
    table = Table("modality", "factory", "vectors", f"recall@{cfg.recall_k}", "params", "device")
    for name, entry in info["modalities"].items():
        params = " ".join(f"{k}={v}" for k, v in entry["params"].items()) or "exact"
        below = f" (below {cfg.target_recall:g})"
        recall = f"{entry[key]:.3f}" + ("" if entry["recall_target_met"] else below)
        table.add_row(name, entry["factory"], str(entry["count"]), recall, params, entry["device"])
    out = Console()
    out.print(table)
    out.print(f"{info['num_clips']} clips in {len(info['shards'])} shards indexed in {store}/index")


@app.command()
def check(
    store: str = typer.Argument(..., help="Store directory written by `avindex embed`."),
    repair: bool = typer.Option(
        False,
        "--repair",
        help="Move bad shards into STORE/quarantine/ (never deleted; their videos are embedded "
        "again by the next embed), rewrite wrong catalog entries, remove the tmp files and "
        "claims of dead writers.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Verify every shard of a store completely, its catalog, tmp files and claims; the exit code
    is 1 while problems remain.

    Example: avindex check store/ --repair
    """
    import json

    from avindex.check import check_store

    report = check_store(store, repair=repair)
    if json_out:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for finding in report.findings:
            print(finding.line())
        print(report.summary())
    if not report.clean:
        raise typer.Exit(1)


@app.command()
def embed(
    inputs: list[str] = typer.Argument(..., help="Video files or folders (searched recursively)."),
    model: str = typer.Option(
        ..., help="Checkpoint from `avindex train`, or 'random' (untrained)."
    ),
    store: str = typer.Option(..., help="Store folder (created if missing; re-runs resume)."),
    hop: float = typer.Option(None, help="Seconds between clip starts (default 1.0)."),
    batch_size: int = typer.Option(None, help="Clips per model batch."),
    device: str = typer.Option(None, help="auto | cpu | cuda."),
    workers: int = typer.Option(None, help="Background decoder threads."),
    preset: str = typer.Option(
        "small", help="With --model random: the model preset (small or paper)."
    ),
    width: float = typer.Option(
        None, help="With --model random: tower width multiplier (default: the preset's)."
    ),
    seed: int = typer.Option(0, help="With --model random: weight seed."),
    retry_failed: bool = typer.Option(False, help="Try again the videos that failed before."),
    part: str = typer.Option(
        None,
        help="K/N: embed only share K (0..N-1) of the inputs, split by a stable hash of each "
        "path, so N processes on N machines (a Slurm array, a shell loop) fill one store.",
    ),
    ray: bool = typer.Option(
        False,
        "--ray",
        help="Embed on a Ray cluster: one actor per GPU (or CPU actors), each with its own "
        "decoders, model and shards (needs the `dist` extra: pip install 'avindex[dist]').",
    ),
    ray_address: str = typer.Option(
        None, help="With --ray: the cluster's address (default: RAY_ADDRESS, else a local Ray)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Embed every second of every video into the store (resumable; bad files are reported).

    Example: avindex embed videos/ --model run/best.pt --store store/
    Many machines: avindex embed videos/ --model m.pt --store store/ --part $K/$N
    A Ray cluster: avindex embed videos/ --model m.pt --store /shared/store --ray
    """
    import functools
    import json
    from pathlib import Path

    from avindex.config import EmbedConfig, replace
    from avindex.embed import embed_paths
    from avindex.model import load_checkpoint, random_checkpoint
    from avindex.progress import EmbedProgress
    from avindex.scan import scan_inputs, select_part

    cfg = replace(
        EmbedConfig(), hop=hop, batch_size=batch_size, device=device, decode_workers=workers
    )
    found = scan_inputs(inputs)
    paths = select_part(found.paths, part)
    for missing in found.missing:
        print(f"avindex: skipped input: {missing}: no such file or folder", file=sys.stderr)
    if model == "random":
        ckpt = random_checkpoint(width, seed, preset=preset)
    else:
        ckpt = load_checkpoint(model)
    if ckpt.untrained:
        print(f"note: {ckpt.extra['label']}: embeddings are for timing only", file=sys.stderr)
    run = embed_paths
    if ray:
        try:
            from avindex.ray_embed import embed_on_ray
        except ImportError as exc:
            raise AvindexError(
                f"--ray: Ray is not installed ({exc.name}); pip install 'avindex[dist]'"
            ) from None
        run = functools.partial(embed_on_ray, address=ray_address)
    elif ray_address is not None:
        raise AvindexError("--ray-address: goes with --ray")
    with EmbedProgress(enabled=not json_out) as progress:
        report = run(
            paths,
            Path(store),
            ckpt,
            cfg,
            retry_failed=retry_failed,
            on_start=progress.start,
            on_progress=progress.update,
            model_path=None if model == "random" else model,
        )
    if json_out:
        print(json.dumps({**report.to_dict(), "missing_inputs": found.missing}, indent=2))
    else:
        progress.summary(report, store)
    if found.missing:
        raise typer.Exit(1)  # the rest is embedded; a typo in a path must not pass unnoticed


@app.command()
def train(
    videos: list[str] = typer.Argument(..., help="Training videos or folders (recursive)."),
    out: str = typer.Option(..., help="Run folder: last.pt, best.pt, metrics.jsonl."),
    labels: str = typer.Option(
        None, help="labels.csv (video,second,label): validation R@k by class, else by video."
    ),
    head: str = typer.Option(None, help="contrastive | ave | l3 (default: contrastive)."),
    width: float = typer.Option(None, help="Tower width multiplier (1.0 = paper)."),
    preset: str = typer.Option(
        None,
        help="Model preset: small (narrow CPU model: 112 px frames, 2x pooled spectrogram, width "
        "0.125) or paper (224 px, width 1). Default: small without CUDA, paper with it.",
    ),
    small: bool = typer.Option(
        None, "--small/--full", help="Shorthands for --preset small / --preset paper."
    ),
    batch_size: int = typer.Option(None, help="AVC pairs per step (half positive)."),
    lr: float = typer.Option(None, help="Adam learning rate."),
    max_steps: int = typer.Option(None, help="Stop after this many steps (with a checkpoint)."),
    time_limit: float = typer.Option(None, help="Stop after this many seconds (checkpointed)."),
    checkpoint_every: int = typer.Option(None, help="Write last.pt every N steps."),
    val_every: int = typer.Option(None, help="Validate (and maybe update best.pt) every N steps."),
    patience: int = typer.Option(
        None,
        help="Stop after N steps without a better validation criterion (0: never). Default: 10 "
        "validations with --time-limit, off without.",
    ),
    holdout: str = typer.Option(
        None,
        help="What validation holds out until the fold-in: videos (a fifth of them; measures "
        "videos never seen; the default) or moments (the last fifth of every video; measures "
        "search within this collection, for collections whose videos are all unlike each other).",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an OUT with a run."),
    device: str = typer.Option(None, help="auto | cpu | cuda."),
    seed: int = typer.Option(None, help="Seed for weights, the validation split and sampling."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train L3-Net on audio-visual correspondence (self-supervised) from your videos.

    Example: avindex train corpus/ --out run/ --labels corpus/labels.csv --time-limit 120
    Data-parallel: torchrun --nproc-per-node N $(which avindex) train ... (one shard each).
    """
    import dataclasses
    import json

    from avindex.devices import resolve_device
    from avindex.presets import default_preset, get_preset
    from avindex.train import resume_train_config
    from avindex.train import train as run_training

    if small is not None:
        if preset is not None and preset != ("small" if small else "paper"):
            raise AvindexError(f"--preset {preset} contradicts --{'small' if small else 'full'}")
        preset = "small" if small else "paper"
    chosen = get_preset(preset) if preset else default_preset(resolve_device(device or "auto"))
    overrides = {
        "batch_size": batch_size,
        "lr": lr,
        "max_steps": max_steps,
        "time_limit": time_limit,
        "checkpoint_every": checkpoint_every,
        "val_every": val_every,
        "patience": patience,
        "holdout": holdout,
        "device": device,
        "seed": seed,
    }
    chosen = chosen.configure(head=head, width=width, **overrides)
    if resume:
        saved = resume_train_config(out, **overrides)
        if saved is not None:
            chosen = dataclasses.replace(chosen, train=saved)
    result = run_training(
        videos,
        out,
        chosen,
        labels=labels,
        resume=resume,
        progress=not json_out,
        overwrite=overwrite,
    )
    if json_out:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(result.summary())


@app.command()
def search(
    store: str = typer.Argument(..., help="Indexed store (`avindex embed`, then `avindex index`)."),
    audio: str = typer.Option(
        None, "--audio", help="Sound query: any file FFmpeg decodes (wav, flac, mp3, a video)."
    ),
    image: str = typer.Option(None, "--image", help="Picture query (jpg, png, any size)."),
    video: str = typer.Option(None, "--video", help="Video query: the clip starting at --at."),
    at: float = typer.Option(None, "--at", help="With --video: clip start in seconds."),
    clip: int = typer.Option(None, "--clip", help="Query by a stored clip id."),
    vector: str = typer.Option(None, "--vector", help="Query by an embedding saved as .npy."),
    by: str = typer.Option(
        None,
        "--by",
        help="Which embedding of a --video/--clip/--vector query to use: visual (default) or "
        "audio. --audio queries are audio, --image queries visual.",
    ),
    target: str = typer.Option(
        None,
        "--in",
        help="Index searched: visual or audio. Default: the other modality (cross-modal: a sound "
        "finds pictures, a picture finds sounds); the query's own modality = same-modality.",
    ),
    k: int = typer.Option(None, "-k", "--k", help="Results per query (default 10)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list, one entry a query."),
    batch: str = typer.Option(
        None,
        "--batch",
        help="File of many queries run in one call: one query's flags per line (e.g. "
        '\'--video a.mp4 --at 12 --in audio\'), or a JSON list like [{"audio": "dog.wav"}]; '
        "paths relative to the file. Bad queries are reported and skipped.",
    ),
    sheet: str = typer.Option(
        None, "--sheet", help="Write a PNG contact sheet of each query and its result frames."
    ),
    model: str = typer.Option(
        None,
        "--model",
        help="Checkpoint the store was embedded with (default: the one the store records).",
    ),
    device: str = typer.Option(None, help="auto | cpu | cuda (query encoding and faiss)."),
) -> None:
    """Search an indexed store with a sound, picture, video moment, clip or vector.

    Prints rank, score, clip id, video, start time and whether the clip has audio.

    Example (pictures that go with a sound): avindex search store/ --audio bark.mp3 --sheet s.png

    Same sound elsewhere: avindex search store/ --video a.mp4 --at 12 --by audio --in audio
    """
    import json

    from avindex.config import SearchConfig, replace
    from avindex.queries import make_query, parse_batch
    from avindex.search import Searcher

    fields = {"audio": audio, "image": image, "video": video, "vector": vector, "at": at}
    fields.update({"clip": clip, "by": by, "in": target})
    if batch is not None:
        if any(fields[name] is not None for name in ("audio", "image", "video", "clip", "vector")):
            raise AvindexError(
                "--batch: give the queries in the file, not also on the command line"
            )
        if at is not None:
            raise AvindexError("--at: goes with --video, inside the batch file")
        queries = parse_batch(batch)
        if not queries:
            raise AvindexError(f"{batch}: no queries in the batch file")
        defaults = {"by": by, "in": target}
        queries = [_batch_default(q, defaults) for q in queries]
    else:
        queries = [make_query(fields)]
    cfg = replace(SearchConfig(), k=k, device=device)
    with Searcher(store, model, cfg) as searcher:
        results = searcher.run(queries, cfg.k)
    failed = [r for r in results if r.error is not None]
    if batch is None and failed:
        raise AvindexError(failed[0].error)
    for note in searcher.notes():
        print(f"note: {note}", file=sys.stderr)
    for r in failed:
        print(f"avindex: skipped query: {r.error}", file=sys.stderr)
    if sheet is not None and len(failed) < len(results):
        from avindex.sheet import write_sheet

        write_sheet(results, sheet, searcher.audio_cfg, cfg.sheet_results)
        print(f"contact sheet: {sheet}", file=sys.stderr)
    if json_out:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        _print_results([r for r in results if r.error is None])
    if len(failed) == len(results):
        raise AvindexError(f"{batch}: none of the {len(results)} queries could be run")


def _batch_default(query: object, defaults: dict[str, str | None]) -> object:
    """Apply command-line --by/--in to batch queries that do not set their own."""
    import dataclasses

    from avindex.queries import Query

    if not isinstance(query, Query):
        return query
    changed = dataclasses.replace(
        query,
        by=query.by if query.by is not None else defaults["by"],
        target=query.target if query.target is not None else defaults["in"],
    )
    try:
        changed.check()
    except AvindexError as exc:
        return exc
    return changed


def _print_results(results: list) -> None:
    """One table per query: rank, score, clip, video, t0, audio."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for r in results:
        table = Table("rank", "score", "clip", title_justify="left")
        table.add_column("video", overflow="fold")  # whole paths: users open these files
        table.add_column("t0 (s)")
        table.add_column("audio")
        table.title = f"{r.description} -> {r.searched} index"
        for h in r.hits:
            has_audio = "yes" if h.has_audio else "no"
            table.add_row(
                str(h.rank), f"{h.score:.4f}", str(h.id), _short(h.path), f"{h.t0:g}", has_audio
            )
        console.print(table)
        if not r.hits:
            console.print("no results (empty index?)")


@app.command()
def serve(
    store: str = typer.Argument(..., help="Indexed store (`avindex embed`, then `avindex index`)."),
    host: str = typer.Option(
        None, help="Address to listen on (default 127.0.0.1; any other needs --token)."
    ),
    port: int = typer.Option(None, help="Port (default 8000)."),
    token: str = typer.Option(
        None,
        envvar="AVINDEX_SERVE_TOKEN",
        help="Secret every API and media request must carry (header, cookie or ?token=); "
        "open the page as /?token=SECRET. Required off loopback.",
    ),
    model: str = typer.Option(
        None, help="Checkpoint the store was embedded with (default: the one the store records)."
    ),
    device: str = typer.Option(None, help="auto | cpu | cuda (query encoding and faiss)."),
    max_upload_bytes: int = typer.Option(None, help="Largest upload (whole request, bytes)."),
    max_upload_seconds: float = typer.Option(None, help="Longest sound or video query, seconds."),
    k: int = typer.Option(None, "-k", "--k", help="Results per query unless a request says."),
    max_k: int = typer.Option(None, help="Most results a request may ask for."),
) -> None:
    """Serve search over HTTP: a JSON API and a web page to drop a sound, picture or video
    into, look at the results and play them from the right moment.

    Example: avindex serve store/ --port 8000   (then open http://127.0.0.1:8000/)
    """
    from avindex.config import ServeConfig, replace

    try:
        from avindex.serve.app import serve as run_server
    except ImportError as exc:
        raise AvindexError(
            f"avindex serve needs the serve extra ({exc.name} is missing): "
            "pip install 'avindex[serve]'"
        ) from None
    cfg = replace(
        ServeConfig(),
        host=host,
        port=port,
        token=token,
        device=device,
        max_upload_bytes=max_upload_bytes,
        max_upload_seconds=max_upload_seconds,
        k=k,
        max_k=max_k,
    )
    run_server(store, cfg, model)


@app.command("eval")
def eval_command(
    store: str = typer.Argument(..., help="Store directory written by `avindex embed`."),
    labels: str = typer.Option(
        ...,
        help="CSV with a header: 'video,second,label' (class of every second, as `avindex synth` "
        "writes; clip [t0,t0+1) takes second floor(t0+0.5)) or 'video,label' (one class per "
        "video). Video paths relative to the CSV's folder, or absolute.",
    ),
    max_queries: int = typer.Option(
        None, "--max-queries", help="Queries per direction; more clips are sampled (seeded)."
    ),
    seed: int = typer.Option(None, help="Seed of the query sample."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """R@1/R@5/R@10 and mAP of audio->visual, visual->audio, audio->audio and visual->visual
    retrieval by class labels, each beside chance (exact search; the query clip itself never
    counts in same-modality retrieval).

    Example: avindex eval store/ --labels corpus/labels.csv
    """
    import json

    from avindex.config import EvalConfig, replace
    from avindex.evaluate import evaluate, print_report

    report = evaluate(store, labels, replace(EvalConfig(), max_queries=max_queries, seed=seed))
    if json_out:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)


@app.command()
def bench(
    stage: str = typer.Option(
        None, help="Comma-separated stages: decode,frontend,model,embed,train,index,search (all)."
    ),
    videos: str = typer.Option(None, help="Benchmark these videos (default: a synthetic corpus)."),
    json_out: str = typer.Option(None, "--json", help="Write the full results as JSON here."),
    plot: str = typer.Option(None, help="Write a PNG plot of the results here."),
    device: str = typer.Option(None, help="auto | cpu | cuda."),
    width: float = typer.Option(None, help="Tower width (default 0.125 on CPU, 1.0 on CUDA)."),
    repeats: int = typer.Option(None, help="Best of this many runs per measurement."),
    batch_size: int = typer.Option(None, help="embed batch size (clips per model batch)."),
    workers: int = typer.Option(None, help="embed decoder processes."),
    corpus: str = typer.Option(
        None, help="Synthetic corpus: classes (default) or natural (x264 defaults, texture)."
    ),
    count: int = typer.Option(None, help="Videos in the synthetic corpus."),
    seconds: int = typer.Option(None, help="Length of each synthetic video (s)."),
    size: str = typer.Option(None, help="Synthetic frame size WxH, e.g. 1280x720."),
    fps: float = typer.Option(None, help="Natural corpus frame rate."),
    codec: str = typer.Option(None, help="Natural corpus codec: h264 or hevc."),
    copies: int = typer.Option(None, help="Each video this many times (hard links)."),
    sessions: int = typer.Option(None, help="embed NVDEC sessions in flight (CUDA)."),
    train_batch: int = typer.Option(None, help="Training batch size (default: the preset's)."),
) -> None:
    """Measure every stage against its bound and a naive baseline, in one run, with targets.

    Example: avindex bench --json bench-out/results.json --plot bench-out/results.png
    """
    import shlex

    from rich.console import Console

    from avindex.bench.report import print_table, write_json, write_plot
    from avindex.bench.runner import parse_stages, run_bench
    from avindex.config import BenchConfig, EmbedConfig, replace

    if corpus not in (None, "classes", "natural"):
        raise AvindexError(f"--corpus {corpus}: choose classes or natural")
    width_height = _size(size)
    cfg = replace(
        BenchConfig(),
        device=device,
        width=width,
        repeats=repeats,
        corpus=corpus,
        videos=count,
        seconds=seconds,
        size=width_height if width_height[0] is not None else None,
        fps=fps,
        codec=codec,
        copies=copies,
        train_batch=train_batch,
    )
    embed_cfg = replace(
        EmbedConfig(), batch_size=batch_size, decode_workers=workers, nvdec_sessions=sessions
    )
    err = Console(stderr=True)
    with err.status("bench") as status:
        result = run_bench(
            parse_stages(stage),
            videos,
            cfg,
            embed_cfg,
            on_stage=lambda name: status.update(f"bench: {name}"),
            command="avindex " + shlex.join(sys.argv[1:]),
        )
    print_table(result)
    if json_out:
        write_json(result, json_out)
    if plot:
        write_plot(result, plot)
    if any("error" in entry for entry in result["stages"].values()):
        raise typer.Exit(1)


@app.command()
def demo(
    out: str = typer.Option(None, help="Folder for everything the demo writes."),
    train_seconds: float = typer.Option(None, help="Training time budget in seconds."),
    videos: int = typer.Option(None, help="Synthetic videos in the corpus."),
    seed: int = typer.Option(None, help="Corpus seed."),
    device: str = typer.Option(None, help="auto | cpu | cuda."),
) -> None:
    """The whole tool on a synthetic corpus: synth -> train -> embed -> index -> search -> eval.

    Example: avindex demo --out avindex-demo
    """
    from avindex.config import DemoConfig, replace
    from avindex.demo import run_demo
    from avindex.evaluate import print_report

    base = DemoConfig()
    cfg = replace(
        base,
        out=out,
        train_seconds=train_seconds,
        device=device,
        corpus=replace(base.corpus, videos=videos, seed=seed),
    )
    report = run_demo(cfg)
    if report.eval is not None:
        print_report(report.eval)
    print(f"\nEverything is in {report.out}:")
    for name, what in (
        ("corpus", "synthetic videos + labels.csv"),
        ("queries", "held-out video and the query sounds/pictures cut from it"),
        ("run", "checkpoints (best.pt, last.pt) and metrics.jsonl"),
        ("store", "embeddings (shard-*.h5) and the faiss index (index/)"),
        ("demo.json", "stage times, training, query and eval results"),
    ):
        print(f"  {report.out / name}: {what}")
    for sheet in report.sheets:
        print(f"  {sheet}: contact sheet")
    total = sum(report.seconds.values())
    print(f"demo finished in {total:.0f} s")
