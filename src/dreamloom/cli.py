"""dreamloom's command line. Each command parses arguments and calls the core; no logic here."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .errors import DreamloomError
from .paths import check_writable_folder, studio_home
from .shell import quiet_libraries, run_command


SHORTCUTS = {"data": "data.path", "trigger": "data.trigger", "class_word": "data.class_word",
             "base": "base.model", "steps": "train.steps", "init_word": "textual_inversion.init_word",
             "vectors": "textual_inversion.vectors", "gpus": "train.processes"}


def _shortcut_values(args) -> dict:
    return {key: getattr(args, name) for name, key in SHORTCUTS.items() if getattr(args, name, None) is not None}


def cmd_train(args) -> int:
    from .recipes import resolve_recipe
    from .rundir import RunDir
    from .trainers.launch import train_in_processes
    from .trainers.run import check_run_inputs, new_run, resume_run, start_run

    def log(line: str) -> None:
        print(line, flush=True)

    if args.resume:
        processes = RunDir.open(args.resume).recipe().train.processes
        if processes > 1:
            return train_in_processes(args.resume, processes)
        run, exports = resume_run(args.resume)
    else:
        if not args.recipe:
            raise DreamloomError("name a recipe (see `dreamloom recipes`) or a .toml file, or pass --resume RUN.")
        recipe = resolve_recipe(args.recipe, args.set, _shortcut_values(args))
        if recipe.train.processes > 1:  # checked here, trained by `accelerate launch` in the run directory
            run = new_run(recipe, args.out, check_run_inputs(recipe, args.out), log)
            return train_in_processes(run.path, recipe.train.processes)
        run, exports = start_run(recipe, args.out, log=log)
    print(f"finished: {run.path}")
    for path in exports:
        print(f"export: {path}")
    return 0


def cmd_caption(args) -> int:
    from tqdm.auto import tqdm

    from .captioning import caption_dataset, load_captioner, pictures

    pictures(Path(args.data).expanduser())  # a wrong folder is said before a model loads
    captioner = load_captioner(args.model, args.mode, threshold=args.threshold)
    written, kept, unreadable = caption_dataset(args.data, captioner, prefix=args.prefix, suffix=args.suffix,
                                                overwrite=args.overwrite,
                                                progress=lambda xs: tqdm(xs, desc="captioning"))
    print(f"{captioner.name}: wrote {written} caption(s) in {args.data}"
          + (f"; kept {kept} existing (--overwrite replaces them)" if kept else ""))
    if unreadable:
        raise DreamloomError(f"{len(unreadable)} picture(s) got no caption: {', '.join(unreadable)}; replace "
                             "unreadable pictures; where the model wrote nothing, try another model (for tags, a "
                             "lower --threshold)")
    return 0


def cmd_sample(args) -> int:
    from .sampling import parse_weighted
    from .sampling.command import MASK_NEEDS_PICTURE, Request, draw_request, write_sample
    from .sampling.images import Hires
    from .sampling.xy import parse_axis

    out = check_image_out(Path(args.out), args.overwrite)
    if args.mask and not args.init_image:  # before any picture is read
        raise DreamloomError(MASK_NEEDS_PICTURE)
    if args.each and not args.overwrite and any(out.parent.glob(f"{out.stem}-[0-9]*.png")):
        raise DreamloomError(f"--each would replace {out.stem}-00001.png ... in '{out.parent}'; choose another --out "
                             "or pass --overwrite.")
    request = Request(
        prompts=args.prompt, base=args.base, run=args.run, step=args.step,
        loras=[parse_weighted(s) for s in args.lora], hypernetworks=[parse_weighted(s) for s in args.hypernetwork],
        embeddings=args.embedding, negative=args.negative, seed=args.seed, steps=args.steps, guidance=args.guidance,
        n=args.n, batch=args.batch, width=args.width, height=args.height, scheduler=args.scheduler,
        clip_skip=args.clip_skip, strength=args.strength,
        init_image=read_picture(args.init_image, "--init-image"), mask=read_picture(args.mask, "--mask"),
        hires=Hires(args.hires, args.hires_strength, args.hires_upscaler, args.hires_steps) if args.hires else None,
        controlnet=args.controlnet, control_image=read_picture(args.control_image, "--control-image"),
        control_scale=args.control_scale,
        x=parse_axis(args.x, "--x") if args.x else None, y=parse_axis(args.y, "--y") if args.y else None)
    picture, cells = draw_request(request)
    written = write_sample(out, picture, cells, request, each=args.each)
    print(f"wrote {out}" + (f" and {len(written) - 1} pictures beside it" if args.each else ""))
    return 0


def read_picture(path: str | None, flag: str):
    """A picture the command starts from, read before any model loads; None when not given."""
    if path is None:
        return None
    from .datasets.images import open_oriented

    try:
        return open_oriented(Path(path).expanduser())
    except FileNotFoundError:
        raise DreamloomError(f"{flag} '{path}' does not exist.") from None
    except Exception as exc:  # PIL raises many types for broken files
        raise DreamloomError(f"{flag} '{path}' is not a readable picture ({type(exc).__name__}); pass a PNG or JPEG.") from None


def check_image_out(out: Path, overwrite: bool) -> Path:
    """The picture `dreamloom sample` writes: checked before any image is generated."""
    from PIL import Image

    if out.is_dir():
        raise DreamloomError(f"--out '{out}' is a folder; give a file name such as {out / 'samples.png'}.")
    if out.exists() and not overwrite:
        raise DreamloomError(f"'{out}' already exists; choose another --out or pass --overwrite.")
    if out.suffix.lower() not in Image.registered_extensions():
        raise DreamloomError(f"--out '{out}': '{out.suffix or '(no suffix)'}' is not an image type; end the name "
                             "with .png (lossless, the default), .jpg or .webp.")
    check_writable_folder(out.parent, "--out's folder")
    return out


def cmd_export(args) -> int:
    from .trainers.run import export_run

    for path in export_run(args.run, args.format or None, overwrite=args.overwrite, step=args.step):
        print(f"export: {path}")
    return 0


def cmd_recipes(args) -> int:
    from .recipes import builtin_names, builtin_text, resolve_recipe

    if args.action == "show":
        if not args.name:
            raise DreamloomError("`dreamloom recipes show NAME`: name a built-in recipe.")
        print(builtin_text(args.name), end="")
        return 0
    for name in builtin_names():
        print(f"{name:24s} {resolve_recipe(name).description}")
    return 0


def cmd_estimate(args) -> int:
    from .estimate import run_estimate

    print(run_estimate(args.recipe, args.base, args.resolution, args.vram, args.set))
    return 0


def cmd_jobs(args) -> int:
    import getpass

    from .jobs.queue import JobQueue

    queue = JobQueue(studio_home(args.home))
    if args.action == "submit":
        from .recipes import resolve_recipe
        from .trainers.run import check_run_inputs

        if not args.recipe:
            raise DreamloomError("`dreamloom jobs submit RECIPE --data FOLDER`: name a recipe.")
        recipe = resolve_recipe(args.recipe, args.set, _shortcut_values(args))
        out = args.out or queue.home / "runs"
        check_run_inputs(recipe, out)
        print(f"job {queue.submit(recipe, out, by=getpass.getuser())} queued")
    elif args.action == "list":
        jobs = queue.jobs()
        for job in jobs:
            why = queue.waiting_reason(job, jobs)
            by = f"  by {job.submitted_by}" if job.submitted_by else ""
            print(f"{job.id:>4}  {job.state:9s}  {job.name:24s}  {job.run_dir or '-'}{by}" + (f"  ({why})" if why else ""))
    elif args.action in ("cancel", "resume", "logs"):
        if args.job is None:
            raise DreamloomError(f"`dreamloom jobs {args.action} ID`: name the job (see `dreamloom jobs list`).")
        if args.action == "cancel":
            print(f"job {args.job}: {queue.cancel(args.job)}")
        elif args.action == "resume":
            queue.requeue(args.job)
            print(f"job {args.job} queued again; it resumes from its latest checkpoint")
        else:
            from .jobs.worker import job_log

            queue.get(args.job)
            log = job_log(queue, args.job)
            print("\n".join(log.read_text().splitlines()[-args.lines:]) if log.exists() else "(no log yet)")
    elif args.action == "worker":
        from .jobs.worker import Policy, run_worker

        policy = Policy(hang=args.hang_timeout, retries=args.retries, backoff=args.backoff)
        if args.ray:
            if args.devices:
                raise DreamloomError("--ray and --devices: a Ray cluster places jobs on its own GPUs; give one of them.")
            from .jobs.ray_worker import serve_on_ray

            serve_on_ray(queue.home, args.ray, policy, once=args.once)
            return 0
        devices, n = (args.devices.split(",") if args.devices else []), args.per_worker
        if len(devices) % n:
            raise DreamloomError(f"--devices {args.devices} cannot be split into workers of --per-worker {n} GPUs; "
                                 f"give a multiple of {n} devices.")
        groups = [",".join(devices[i:i + n]) for i in range(0, len(devices), n)] or [None]
        if len(groups) == 1:
            run_worker(queue.home, groups[0], once=args.once, policy=policy)
        else:  # one worker process per group of GPUs, all on the same queue
            import subprocess

            procs = [subprocess.Popen([sys.executable, "-m", "dreamloom", "jobs", "worker", "--home",
                                       str(queue.home), "--devices", group, "--per-worker", str(n),
                                       "--hang-timeout", str(args.hang_timeout), "--retries", str(args.retries),
                                       "--backoff", str(args.backoff)] + (["--once"] if args.once else []))
                     for group in groups]
            return max(p.wait() for p in procs)
    return 0


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def cmd_studio(args) -> int:
    """One queue worker and the Streamlit server; the worker stops when the server does (its trainer
    then checkpoints, and the job resumes when the studio is next started)."""
    import signal
    import subprocess

    from .studio.login import PASSWORD_ENV, read_password, server_environment

    password = read_password(args.password_file)
    if password is None and args.host not in LOCAL_HOSTS:
        raise DreamloomError(f"--host {args.host} opens the studio beyond this machine: give the team a password "
                             f"(--password-file FILE, or ${PASSWORD_ENV}) so that only they can log in.")
    home = studio_home(args.home)
    home.mkdir(parents=True, exist_ok=True)
    # the password itself goes to no process: the server gets only its salted hash
    env = {k: v for k, v in dict(os.environ, DREAMLOOM_HOME=str(home)).items() if k != PASSWORD_ENV}
    # Its own session: Ctrl-C reaches only the server, and the worker is stopped below, quietly.
    worker = subprocess.Popen([sys.executable, "-m", "dreamloom", "jobs", "worker", "--home", str(home)]
                              + (["--ray", args.ray] if args.ray else []), env=env, start_new_session=True)
    app = Path(__file__).parent / "studio" / ("shared_app.py" if password else "app.py")
    command = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host,
               "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]
    login = " with a login" if password else ""
    print(f"dreamloom studio: http://{args.host}:{args.port}{login}  (home: {home}; Ctrl-C stops it)", flush=True)
    server = subprocess.Popen(command, env=dict(env, **(server_environment(password) if password else {})))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a kill runs the clean-up below too
    try:
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the server too: let it finish stopping
        return server.wait()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second kill must not cut the clean-up short
        for proc in (worker, server):
            if proc.poll() is None:
                proc.terminate()
        for proc in (worker, server):
            proc.wait()


def cmd_doctor(args) -> int:
    from .doctor import format_report, report

    checks = report()
    print(format_report(checks))
    return 1 if any(c.level == "problem" for c in checks) else 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out))
    return 0


def cmd_toy(args) -> int:
    if args.action in ("data", "pretrain") and not args.out:
        raise DreamloomError(f"`dreamloom toy {args.action}` needs --out FOLDER.")
    if args.action == "data":
        from .toy.world import write_subject_folder

        paths = write_subject_folder(Path(args.out), args.shape, args.count, args.seed, args.colour)
        print(f"wrote {len(paths)} pictures of a {args.colour} {args.shape} (with .txt captions) to {args.out}")
        return 0
    from .toy.evaluate import BAR, Settings, base_bar

    if args.action == "pretrain":
        from .toy.pretrain import pretrain

        path = pretrain(Path(args.out), images=args.images, vae_steps=args.vae_steps, steps=args.steps,
                        overrides=args.set, seed=args.seed)
        print(f"toy base: {path} (diffusers folder: {Path(args.out) / 'base'})")
        spec = str(Path(args.out) / "base")
    else:
        spec = args.base
    from .models import load_base

    scores = base_bar(load_base(spec), n=args.samples, settings=Settings(steps=25, guidance=3.0))
    verdict = all(scores[k] >= v for k, v in BAR.items())
    print(" ".join(f"{k} {scores[k]:.1f}% (bar {BAR[k]:.0f}%)" for k in BAR) + f" all {scores['all']:.1f}%")
    print("the base meets its bar" if verdict else "the base does NOT meet its bar")
    return 0 if verdict else 1


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def cmd_eval(args) -> int:
    from .toy.evaluate import Settings, evaluate_run, table

    settings = Settings(samples=args.samples, steps=args.steps, guidance=args.guidance)
    if args.methods:
        from .toy.benchmark import parse_methods, parse_subjects, run_benchmark

        path = run_benchmark(parse_methods(args.methods), parse_subjects(args.subjects), Path(args.out), settings,
                             sets=args.set, colour_captions=args.colour_captions)
        print(path.read_text())
        print(f"wrote {path}")
        return 0
    if not args.runs:
        raise DreamloomError("`dreamloom eval RUN...` evaluates runs; `dreamloom eval --methods all` trains and "
                             "evaluates every method on the toy base.")
    if args.clip:
        from .clip_metrics import evaluate_real_run

        for run in args.runs:
            scores = evaluate_real_run(run, args.clip, args.dino)
            print(f"{run}: " + "  ".join(f"{k.upper().replace('_', '-')} {v:.3f}" for k, v in scores.items()))
        return 0
    if args.dino:
        raise DreamloomError("--dino goes with --clip (the DINO score is computed beside CLIP-T / CLIP-I).")
    if args.all_checkpoints:
        from .toy.evaluate import evaluate_checkpoints

        for run in args.runs:
            report = evaluate_checkpoints(run, settings)
            print(f"{run} ({report['method']}): every checkpoint")
            print(table({"untouched base": report["base_metrics"],
                         **{f"step {s}": m for s, m in report["checkpoints"].items()}}))
            print(f"wrote {Path(run) / 'eval'} (checkpoints.md, checkpoints.json)")
        return 0
    for run in args.runs:
        report = evaluate_run(run, settings)
        print(f"{run} ({report['method']}; subject: {report['subject']['colour']} {report['subject']['shape']})")
        print(table({"untouched base": report["base_metrics"], report["method"]: report["metrics"]}))
        print(f"wrote {Path(run) / 'eval'} (quality.md, metrics.json, samples.png)")
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small: at least 1")
    return value


def unit_float(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is outside 0 to 1")
    return value


def scheduler_choice(text: str) -> str:
    from .sampling.schedulers import scheduler_name

    try:
        return scheduler_name(text)
    except DreamloomError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


UPSCALER_CHOICES = ("latent", "lanczos")


def hires_scale(text: str) -> float:
    value = finite_float(text)
    if not 1 < value <= 4:
        raise argparse.ArgumentTypeError(f"{text} is not an upscale factor from just above 1 to 4 (e.g. 1.5 or 2)")
    return value


def picture_side(text: str) -> int:
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8 (the VAE works in 8-pixel cells); "
                                         f"try {max(8, value // 8 * 8)}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamloom", description="Personalization fine-tuning for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe on a folder of images, or resume a run")
    p.add_argument("recipe", nargs="?", help="built-in recipe name or a .toml file")
    p.add_argument("--data", help="folder of training images (data.path)")
    p.add_argument("--trigger", help="the new word for the subject (data.trigger)")
    p.add_argument("--class-word", dest="class_word", help="what the subject is, e.g. dog (data.class_word)")
    p.add_argument("--base", help="base model: tiny, random:sd15, folder, .safetensors, hub id (base.model)")
    p.add_argument("--steps", type=int, help="training steps (train.steps)")
    p.add_argument("--init-word", dest="init_word", help="embeddings start from this word (textual_inversion.init_word)")
    p.add_argument("--vectors", type=int, help="embedding vectors, 1 to 16 (textual_inversion.vectors)")
    p.add_argument("--out", default="runs", help="folder that receives the run directory (default: runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any recipe key, e.g. lora.rank=16")
    p.add_argument("--resume", metavar="RUN", help="continue a crashed or killed run from its latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("caption", help="write a .txt caption beside every picture with a local captioner or tagger")
    p.add_argument("data", help="folder of pictures (kohya-style <repeats>_<caption> sub-folders too)")
    p.add_argument("--model", required=True, help="captioner folder or cached hub id: BLIP, Florence-2, Qwen2-VL, "
                   "LLaVA; with --mode tags a WD14-style tagger")
    p.add_argument("--mode", choices=["caption", "tags"], default="caption", help="a sentence, or comma-separated tags")
    p.add_argument("--prefix", default="", help="put before every caption, e.g. the trigger: 'sks,'")
    p.add_argument("--suffix", default="")
    p.add_argument("--threshold", type=finite_float, default=0.35, help="tags: the score a tag needs (default 0.35)")
    p.add_argument("--overwrite", action="store_true", help="replace captions that exist (default: keep them)")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("sample", help="draw images with a base model and LoRA / hypernetwork / embedding files, or a "
                       "run's exports; img2img, inpainting, hires fix, ControlNet, X/Y plots")
    p.add_argument("--base", help="a base: tiny, toy, a diffusers folder or a single .safetensors file (default tiny)")
    p.add_argument("--run", help="a training run: its exports on its own base (the latest, or --step's checkpoint)")
    p.add_argument("--step", type=positive_int, help="with --run: the checkpoint at this training step")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="LoRA/LyCORIS file (kohya or diffusers), repeatable")
    p.add_argument("--hypernetwork", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="hypernetwork .pt or .safetensors, repeatable (applied in order)")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="textual-inversion embedding (A1111 .safetensors/.pt, diffusers learned_embeds), repeatable; "
                        "its file name is the prompt word")
    p.add_argument("--prompt", action="append", required=True, help="repeatable: one grid row per prompt. A1111's "
                   "syntax: (word:1.3) or (word) weighs more, [word] less, BREAK starts a new 75-token chunk; any length")
    p.add_argument("--negative", default="", help="negative prompt (same syntax)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first picture; the next ones count up")
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--guidance", type=finite_float, default=7.5, help="CFG scale")
    p.add_argument("--n", type=positive_int, default=1, help="pictures per prompt (A1111's batch count x size)")
    p.add_argument("--batch", type=positive_int, help="pictures drawn at once (memory against speed; the pictures "
                   "stay the same). Default: all of a prompt's")
    p.add_argument("--width", type=picture_side, help="px, a multiple of 8 (default: the base's own size, 1024 for SDXL)")
    p.add_argument("--height", type=picture_side, help="px, a multiple of 8 (default: the base's own size)")
    p.add_argument("--scheduler", type=scheduler_choice, help="the sampler by its A1111 name: Euler a, DPM++ 2M Karras, "
                   "UniPC, ... (default: the base's DDIM)")
    p.add_argument("--clip-skip", dest="clip_skip", type=positive_int, help="A1111's CLIP skip: 2 uses the text "
                   "encoder's next-to-last layer (what many anime bases expect)")
    p.add_argument("--init-image", dest="init_image", help="img2img: start from this picture")
    p.add_argument("--strength", type=unit_float, default=0.75, help="img2img: how much of --init-image is re-drawn, "
                   "0 to 1 (default 0.75)")
    p.add_argument("--mask", help="inpainting: white = re-draw, black = keep, the size of --init-image (an "
                   "inpainting base is used as one, an ordinary base does masked img2img)")
    p.add_argument("--hires", type=hires_scale, metavar="SCALE", help="hires fix: draw, upscale by SCALE (e.g. 2), "
                   "re-draw part of it at the larger size")
    p.add_argument("--hires-strength", dest="hires_strength", type=unit_float, default=0.5,
                   help="hires fix: the share re-drawn at the larger size (default 0.5)")
    p.add_argument("--hires-upscaler", dest="hires_upscaler", choices=UPSCALER_CHOICES, default="latent",
                   help="hires fix: upscale the latents (A1111's Latent) or the picture (Lanczos)")
    p.add_argument("--hires-steps", dest="hires_steps", type=positive_int, help="hires fix: steps of the second "
                   "pass (default --steps)")
    p.add_argument("--controlnet", help="a ControlNet: its diffusers folder or .safetensors file, for this base's family")
    p.add_argument("--control-image", dest="control_image", help="the picture the ControlNet follows (edges, depth, "
                   "pose...), already preprocessed")
    p.add_argument("--control-scale", dest="control_scale", type=finite_float, default=1.0,
                   help="how strongly the ControlNet steers (default 1)")
    p.add_argument("--x", help="X/Y plot columns: NAME=V1,V2,... over seed, cfg, steps, scheduler, strength, step, "
                   "prompt (search/replace), clip_skip; e.g. --x strength=0,0.5,1")
    p.add_argument("--y", help="X/Y plot rows, as --x; e.g. --y step=200,400,600 (with --run)")
    p.add_argument("--each", action="store_true", help="also write every picture on its own (<out>-00001.png, ...), "
                   "each with its own seed in its parameters")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="export a run again from its latest checkpoint")
    p.add_argument("run")
    p.add_argument("--format", action="append", help="one of the run's method's formats (default: the recipe's export.formats)")
    p.add_argument("--overwrite", action="store_true", help="replace existing export files")
    p.add_argument("--step", type=positive_int, help="export this checkpoint's step (default: the latest)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("recipes", help="list built-in recipes, or print one as TOML")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("estimate", help="predict a recipe's peak GPU memory, term by term")
    p.add_argument("recipe", help="built-in recipe name or a .toml file")
    p.add_argument("--base", help="tiny, random:sd15, random:sd21, or a local model (default: the recipe's)")
    p.add_argument("--resolution", type=int, help="training resolution in px (default: the recipe's)")
    p.add_argument("--vram", type=float, help="the card's memory in GiB: warn when the run will not fit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any recipe key")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("bench", help="a training step's cost: dreamloom's loop against the example scripts' and the bare math")
    p.add_argument("recipes", nargs="*", help="built-in recipe names or .toml files (default: tiny-lora)")
    p.add_argument("--base", help="the base to train (default: each recipe's)")
    p.add_argument("--resolution", type=positive_int, help="px (default: each recipe's)")
    p.add_argument("--batch", type=positive_int, help="pictures per step (default: each recipe's)")
    p.add_argument("--steps", type=positive_int, default=200, help="measured steps of each loop (default 200)")
    p.add_argument("--warmup", type=positive_int, default=20, help="steps before the measurement (default 20)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe value for every loop, e.g. --set train.compile=blocks (repeatable)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("jobs", help="the job queue the studio uses: submit, list, cancel, resume, logs, worker")
    p.add_argument("action", choices=["submit", "list", "cancel", "resume", "logs", "worker"])
    p.add_argument("job", nargs="?", type=int, help="job id (cancel, resume, logs)")
    p.add_argument("--home", help="studio home folder (default: $DREAMLOOM_HOME or ~/.dreamloom)")
    p.add_argument("--recipe", help="submit: built-in recipe name or .toml file")
    p.add_argument("--data")
    p.add_argument("--trigger")
    p.add_argument("--class-word", dest="class_word")
    p.add_argument("--base")
    p.add_argument("--steps", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="submit: folder for the run directory (default: <home>/runs)")
    p.add_argument("--lines", type=int, default=40, help="logs: how many lines")
    p.add_argument("--gpus", type=positive_int, help="submit: processes (GPUs) the run trains on (train.processes)")
    p.add_argument("--devices", help="worker: comma-separated GPU ids, one worker each (e.g. 0,1)")
    p.add_argument("--per-worker", dest="per_worker", type=positive_int, default=1,
                   help="worker: GPUs each worker owns (--devices 0,1,2,3 --per-worker 2: two workers that each "
                        "take jobs of up to 2 GPUs)")
    p.add_argument("--ray", metavar="ADDRESS", help="worker: run the jobs on the Ray cluster at ADDRESS (host:port "
                   "of `ray start --head`); the home folder must be one every node sees at the same path")
    p.add_argument("--once", action="store_true", help="worker: stop when the queue is empty")
    p.add_argument("--hang-timeout", dest="hang_timeout", type=finite_float, default=300.0,
                   help="worker: seconds without a heartbeat after which a job's process counts as hung and is "
                        "stopped, then retried from its checkpoint (default 300)")
    p.add_argument("--retries", type=positive_int, default=3, help="worker: starts a job gets in all before it "
                   "stays failed after crashes or hangs (bad input is never retried; default 3)")
    p.add_argument("--backoff", type=finite_float, default=30.0, help="worker: seconds before the first retry, "
                   "doubled for each next one (default 30)")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("studio", help="the web dashboard, with a worker that runs its jobs")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--home", help="studio home folder (default: $DREAMLOOM_HOME or ~/.dreamloom)")
    p.add_argument("--password-file", help="a file holding the team's password: every page, upload and download "
                   "then needs a login (also $DREAMLOOM_PASSWORD); required with a --host beyond this machine")
    p.add_argument("--ray", metavar="ADDRESS", help="run the studio's jobs on the Ray cluster at ADDRESS (see "
                   "`jobs worker --ray`) instead of on this machine")
    p.set_defaults(func=cmd_studio)

    p = sub.add_parser("toy", help="the toy world: subject pictures, pretraining of the toy base, its bar")
    p.add_argument("action", choices=["data", "pretrain", "check"])
    p.add_argument("--out", help="data: folder for the pictures; pretrain: folder for the new base")
    p.add_argument("--shape", default="heart", help="data: the subject shape (heart, diamond, crescent, ...)")
    p.add_argument("--colour", default="orange", help="data: its colour")
    p.add_argument("--count", type=int, default=4, help="data: how many pictures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=16000, help="pretrain: pictures in the pretraining set")
    p.add_argument("--vae-steps", dest="vae_steps", type=int, default=1500, help="pretrain: VAE training steps")
    p.add_argument("--steps", type=int, help="pretrain: UNet steps (default: the toy-pretrain recipe's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pretrain: override a toy-pretrain key")
    p.add_argument("--base", default="toy", help="check: the base to check (default: the shipped toy base)")
    p.add_argument("--samples", type=int, default=128, help="pretrain/check: pictures judged for the bar")
    p.set_defaults(func=cmd_toy)

    p = sub.add_parser("eval", help="quality of runs on the toy base, or of every method (QUALITY.md)")
    p.add_argument("runs", nargs="*", help="run directories to evaluate")
    p.add_argument("--methods", help="all, or a comma list: train each toy recipe and evaluate it")
    p.add_argument("--subjects", default="heart,crescent", help="--methods: subject shapes (default: heart,crescent)")
    p.add_argument("--out", default="quality-out", help="--methods: folder for runs and QUALITY.md")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="--methods: override a key of every toy recipe (a variant to compare, e.g. lora.rank=2)")
    p.add_argument("--colour-captions", dest="colour_captions", action="store_true",
                   help="--methods: the subject's captions name its colour too (\"a orange sks shape on ...\")")
    p.add_argument("--samples", type=int, default=64, help="pictures per metric (at least 64 for +-6 points)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--clip", help="runs on real bases: a CLIP model (local folder or cached hub id) for CLIP-T / CLIP-I")
    p.add_argument("--dino", help="with --clip: a DINO ViT (local folder or cached hub id) for the DINO score")
    p.add_argument("--all-checkpoints", dest="all_checkpoints", action="store_true",
                   help="score every checkpoint the runs hold, beside their validation loss")
    p.set_defaults(func=cmd_eval)

    from .lora_tools.cli import add_parser as add_lora_parser

    add_lora_parser(sub)

    p = sub.add_parser("doctor", help="the libraries, devices and disk this installation has, and known breaks")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("demo", help="train toy-lora on four crescents (a shape the toy base never saw) and sample it")
    p.add_argument("--out", default="demo-out")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
