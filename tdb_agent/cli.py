"""`tdb-agent` command line: serve the MCP tools, discover circuits, look at runs in the
viewer, or run the demo on the bundled model."""

from __future__ import annotations

import argparse
import logging
import sys

from tdb_agent.session import EngineSpec, open_workbench


def _placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-map", default=None, metavar="auto|balanced|JSON",
                   help="spread the model over devices (accelerate device map): auto, balanced, or a JSON object "
                        "(or file) {module: device} with devices 0, 1, ..., cpu, disk; overrides --device")
    p.add_argument("--max-memory", default=None, metavar="0=70GiB,cpu=100GiB",
                   help="memory cap per device for --device-map auto/balanced")
    p.add_argument("--offload-folder", default=None, metavar="DIR", help="where weights mapped to disk are kept")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local Hugging Face folder or hub id (default: the bundled model)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--allow-download", action="store_true",
                   help="allow fetching a hub model (never needed for the bundled model)")
    _placement_args(p)


def _limit_args(p: argparse.ArgumentParser) -> None:
    """One flag per field of `Limits` (--max-top-k ...), with its default."""
    from tdb_agent.limits import Limits

    def positive(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
        return int(text)

    g = p.add_argument_group("limits (exceeding one is a tool error naming it)")
    for name, field in Limits.model_fields.items():
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=positive, default=field.default,
                       help=f"{field.description} (default {field.default})")


def cmd_serve(args) -> int:
    from tdb_agent.limits import Limits
    from tdb_agent.server.http import HttpSettings, InsecureBind, check_bind, token_from_env

    limits = Limits(**{name: getattr(args, name) for name in Limits.model_fields})
    settings = None
    if args.transport == "http":
        settings = HttpSettings(host=args.host, port=args.port, token=args.token or token_from_env(),
                                allowed_hosts=args.allowed_host)
        try:
            check_bind(settings)  # refuse before loading anything
        except InsecureBind as e:
            print(f"tdb-agent serve: {e}", file=sys.stderr)
            return 2

    from tdb_agent.errors import TdbError
    from tdb_agent.server import build_server
    from tdb_agent.server.http import serve_http
    try:
        bench = open_workbench(EngineSpec.from_args(args), limits=limits, workspace=args.workspace)
    except TdbError as e:  # e.g. a --dataset built from another model
        print(f"tdb-agent serve: {e}", file=sys.stderr)
        return 2
    if settings is not None:
        from tdb_agent.viewer.api import RunIndex
        serve_http(bench, settings, runs=RunIndex(*args.runs))
    else:
        from tdb_agent.server.stdio import run_stdio
        run_stdio(build_server(bench))  # as .run() does, and lines that are not JSON-RPC get an error reply
    return 0


def cmd_discover(args) -> int:
    import asyncio
    import time
    from pathlib import Path

    from tdb_agent.agent import discover
    from tdb_agent.agent.llm import LLMSettings
    from tdb_agent.agent.runstore import RunConfig, RunStore

    tasks = args.task or []
    if not args.resume and (len(tasks) > 1 or args.batch or args.ray):
        from tdb_agent.agent.batch import cmd_batch
        return cmd_batch(args)
    if args.resume:
        out = Path(args.resume)
        cfg = RunStore(out).load_config()
    else:
        cfg = RunConfig(task=tasks[0] if tasks else None, prompt=args.prompt, corrupted_prompt=args.corrupted,
                        target=args.target,
                        distractor=args.distractor, planner=args.planner, model=args.model, max_steps=args.max_steps,
                        llm_model=args.llm_model, ablation=args.ablation, graph=args.graph)
        if not cfg.task and not (cfg.prompt and cfg.target):
            print("tdb-agent discover: give --task, or --prompt and --target", file=sys.stderr)
            return 2
        out = Path(args.out or f"runs/{cfg.task or 'prompt'}-{time.strftime('%Y%m%d-%H%M%S')}")
    llm = LLMSettings.from_env(base_url=args.llm_base_url, model=cfg.llm_model or args.llm_model)
    echo = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    connect = discover.default_connect(cfg, args.transport, spec=EngineSpec.from_args(args, model=cfg.model))
    summary = asyncio.run(discover.run(cfg, out, llm=llm, echo=echo, connect=connect))
    print(summary.model_dump_json(indent=2))
    return 0


def cmd_view(args) -> int:
    """The viewer on loopback (the same app as `serve --transport http`), showing RUN_DIR."""
    import os
    import webbrowser
    from pathlib import Path

    from tdb_agent.server.http import HttpSettings, serve_http
    from tdb_agent.viewer.api import RunIndex, is_run

    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is not None and not run_dir.is_dir():
        print(f"tdb-agent view: {run_dir} is not a folder", file=sys.stderr)
        return 2
    if args.model is None and run_dir is not None and is_run(run_dir) and (run_dir / "run.json").exists():
        from tdb_agent.agent.runstore import RunStore
        args.model = RunStore(run_dir).load_config().model  # the run's model (None: the bundled one)
    bench = open_workbench(EngineSpec.from_args(args))
    runs = RunIndex(*([run_dir] if run_dir else [p for p in [Path("runs")] if p.is_dir()]))
    start = "/"
    if run_dir is not None and is_run(run_dir):
        start = f"/run/{run_dir.resolve().name}"
    url = f"http://127.0.0.1:{args.port}{start}"

    def started():
        print(f"tdb-agent viewer on {url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
        # only where there is a desktop: on a bare server webbrowser may start a text browser in this terminal
        desktop = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        if desktop and not args.no_browser:
            webbrowser.open(url)
    serve_http(bench, HttpSettings(host="127.0.0.1", port=args.port), runs=runs, on_started=started)
    return 0


def cmd_demo(args) -> int:
    """Start-up check plus a prediction on each bundled task."""
    from tdb_agent import ops
    from tdb_agent.tasks import task_examples, task_names

    engine = EngineSpec.from_args(args, bundled_saes=False).load()
    info = ops.model_info(engine)
    s = info.spec
    print(f"model {info.name}: {s.architecture}, {s.n_layers} layers x {s.n_heads} heads, d_model {s.d_model}, "
          f"{info.n_params:,} parameters on {info.device} ({info.dtype})")
    for name in task_names():
        ex = task_examples(name, 1, seed=7)[0]
        r = ops.predict(engine, ex.prompt, top_k=3, target=ex.target, distractor=ex.distractor)
        top = ", ".join(f"{t.token!r} {t.prob:.2f}" for t in r.top)
        print(f"[{name}] {ex.prompt!r}\n    top: {top}\n    {r.metric.name}({ex.target!r} vs {ex.distractor!r}) = "
              f"{r.metric.value:.2f}, p(target) = {r.metric.target_prob:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tdb-agent", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help="run the MCP server (stdio by default)")
    _model_args(p)
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio",
                   help="stdio (for a client that starts the server) or streamable HTTP at http://HOST:PORT/mcp")
    p.add_argument("--host", default="127.0.0.1",
                   help="HTTP bind address (default loopback; any other address requires a token)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=None,
                   help="bearer token every HTTP request must carry (default: $TDB_AGENT_TOKEN; prefer the "
                        "variable, a flag is visible in the process list)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="extra Host header accepted over HTTP (repeatable; DNS-rebinding protection)")
    _limit_args(p)
    p.add_argument("--sae", action="append", default=[], metavar="PATH",
                   help="SAE folder in the SAELens layout (cfg.json + sae_weights.safetensors); repeatable; "
                        "a hub path needs --allow-download")
    p.add_argument("--no-bundled-saes", action="store_true",
                   help="do not attach the bundled model's shipped SAEs")
    p.add_argument("--transcoders", action="append", default=[], metavar="PATH",
                   help="transcoders: SAELens transcoder folders (repeatable, one per layer) or one circuit-tracer "
                        "PLT (config.yaml) or CLT (W_enc_{l}.safetensors) folder; enables attribution graphs")
    p.add_argument("--no-bundled-transcoders", action="store_true",
                   help="do not attach the bundled model's shipped transcoders")
    p.add_argument("--dataset", default=None, metavar="DIR",
                   help="activation dataset (tdb-agent build-dataset) for top_examples and explain_component; "
                        "default: the bundled model's shipped one")
    p.add_argument("--workspace", default=None,
                   help="folder where circuits and exports are saved (default: $TDB_WORKSPACE or ./tdb-workspace)")
    p.add_argument("--runs", action="append", default=[], metavar="DIR",
                   help="over HTTP: run folders (or folders of runs) the viewer at / lists (repeatable)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("discover", help="find the circuit of a behaviour (scripted planner or an LLM agent)")
    p.add_argument("--task", action="append", default=None,
                   help="a built-in task: ioi, induction, greater_than, facts (repeat for a batch of runs)")
    p.add_argument("--batch", default=None, metavar="FILE",
                   help="JSON lines, one run each: {\"task\": ...} or {\"prompt\", \"target\", \"distractor\", "
                        "\"corrupted_prompt\", \"name\"}; runs go to --out/<name>/ with summary.md")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the batch in parallel on Ray engine actors: a local cluster, or the one at ADDRESS "
                        "(pip install 'tdb-agent[ray]')")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU or CPU)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--target", default=None)
    p.add_argument("--distractor", default=None)
    p.add_argument("--corrupted", default=None, help="a corrupted prompt of the same length")
    p.add_argument("--planner", choices=["scripted", "llm"], default="scripted")
    p.add_argument("--model", default=None, help="local HF folder (default: the bundled model)")
    p.add_argument("--device", default="auto")
    _placement_args(p)
    p.add_argument("--out", default=None, help="run folder (default: runs/<task>-<time>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue an interrupted run")
    p.add_argument("--max-steps", type=int, default=40, help="LLM turns (llm planner)")
    p.add_argument("--ablation", choices=["mean", "resample", "both"], default="mean",
                   help="scripted planner: grow and prune until faithfulness reaches the threshold under mean "
                        "ablation, resample ablation, or both (each of them; the report gives both numbers)")
    p.add_argument("--graph", action="store_true",
                   help="scripted planner: also build an attribution graph of the prompt (needs transcoders or "
                        "residual SAEs), check its top features by intervention and, if the check agrees, claim "
                        "and validate the feature circuit (agent/graph_step.py)")
    p.add_argument("--transport", choices=["inprocess", "stdio"], default="inprocess",
                   help="reach the tools in this process or through a `tdb-agent serve` subprocess")
    p.add_argument("--llm-base-url", default=None, help="OpenAI-compatible endpoint (env OPENAI_BASE_URL)")
    p.add_argument("--llm-model", default=None, help="model name (env TDB_AGENT_LLM_MODEL)")
    p.set_defaults(fn=cmd_discover)

    p = sub.add_parser("view", help="open the viewer (model, components, prompt explorer) on a run folder")
    p.add_argument("run_dir", nargs="?", default=None, metavar="RUN_DIR",
                   help="a run folder (tdb-agent discover --out DIR) or a folder of runs (default: ./runs)")
    _model_args(p)
    p.add_argument("--port", type=int, default=8766, help="loopback port (default 8766)")
    p.add_argument("--no-browser", action="store_true", help="print the address instead of opening a browser")
    p.set_defaults(fn=cmd_view)

    p = sub.add_parser("demo", help="start-up check and predictions on the bundled tasks")
    _model_args(p)
    p.set_defaults(fn=cmd_demo)

    from tdb_agent.datasets.command import add_build_dataset
    add_build_dataset(sub, _model_args)
    from tdb_agent.service.graph_batch import add_graphs_command
    add_graphs_command(sub, _model_args)

    args = ap.parse_args(argv)
    # logs go to stderr: stdout carries the MCP protocol on the stdio transport
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from tdb_agent.errors import TdbError
    try:
        return args.fn(args)
    except TdbError as e:  # user-facing (a model that does not fit, Ray missing, ...): say why, no traceback
        print(f"tdb-agent {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
