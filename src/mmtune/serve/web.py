"""`mmtune web`: a browser UI to chat with tuned models, train recipes and read reports.

Three tabs (gradio Blocks, bound to 127.0.0.1 unless ``--host`` says otherwise):

- **Chat**: streaming replies from the loaded model (any directory ``mmtune chat`` takes, or
  a composed multimodal model), a system prompt, temperature / top-p / max new tokens / seed,
  image and audio attachments, and a label of the adapter that answered (the modality
  router's choice for a composed model, else the loaded LoRA adapter or "base model"). A
  text-only model answers attachments with a note that it has no encoder for them.
- **Train**: a shipped recipe (or a recipe path) plus dotted overrides, run in a background
  thread (:class:`mmtune.serve.train_job.TrainJob`); live loss and eval-loss charts, step /
  total, sample generations and the log, polled from ``metrics.jsonl`` once a second. Stop
  ends the run after the current step with a checkpoint saved; the result opens in Chat.
- **Reports**: the ``report.md`` directories under the runs directory (``mmtune demo``,
  ``mmtune continual``), with their figures and metrics JSON.

gradio is an optional dependency (the ``web`` extra), imported when the app is built.
"""

from __future__ import annotations

import argparse
import html
import threading
from dataclasses import dataclass
from pathlib import Path

from ..config import RECIPE_DIR, list_recipes, load_recipe, load_yaml, resolve_recipe_path
from ..errors import MMTuneError
from ..inference.models import ChatModel as ChatBackend
from ..inference.models import load_chat_model
from ..inference.session import ChatSession, Reply
from ..inference.turns import BASE_MODEL, GenerationSettings, Turn, split_attachments
from . import require
from .reports import find_reports, read_report, report_label
from .train_job import TrainJob

DEFAULT_PORT = 7860
TITLE = "mmtune"

CSS = """
.gradio-container { max-width: 1320px !important; margin: 0 auto !important; }
#mm-header { display: flex; align-items: center; gap: 16px; padding: 18px 22px; margin-bottom: 6px;
  border-radius: 14px; color: #fff;
  background: linear-gradient(120deg, #312e81 0%, #4f46e5 55%, #7c3aed 100%); }
#mm-header .mm-logo { width: 46px; height: 46px; border-radius: 12px; background: rgba(255,255,255,.16);
  display: flex; align-items: center; justify-content: center; font-weight: 800; font-size: 20px;
  letter-spacing: -1px; }
#mm-header h1 { margin: 0; font-size: 24px; font-weight: 750; color: #fff; }
#mm-header p { margin: 2px 0 0; opacity: .85; font-size: 14px; color: #fff; }
#mm-header .mm-spacer { flex: 1; }
.mm-pill { display: inline-block; padding: 4px 11px; border-radius: 999px; font-size: 12.5px;
  background: rgba(255,255,255,.16); color: #fff; margin-left: 6px; white-space: nowrap; }
.mm-badge { display: inline-flex; align-items: center; gap: 6px; padding: 4px 12px; border-radius: 999px;
  font-size: 13px; background: #eef2ff; color: #3730a3; border: 1px solid #c7d2fe; }
.mm-badge b { font-weight: 650; }
.mm-dot { width: 8px; height: 8px; border-radius: 50%; background: #22c55e; display: inline-block; }
.mm-dot.off { background: #94a3b8; }
.mm-progress { padding: 14px 16px; border-radius: 12px; border: 1px solid var(--border-color-primary);
  background: var(--block-background-fill); }
.mm-progress-top { display: flex; gap: 14px; align-items: center; flex-wrap: wrap; font-size: 14px; }
.mm-progress-top .mm-steps { font-weight: 650; font-size: 16px; }
.mm-progress-top .mm-muted { color: var(--body-text-color-subdued); }
.mm-bar { height: 10px; border-radius: 6px; background: #e2e8f0; margin-top: 10px; overflow: hidden; }
.mm-fill { height: 100%; border-radius: 6px; background: linear-gradient(90deg, #6366f1, #8b5cf6);
  transition: width .6s ease; }
.mm-state { padding: 2px 10px; border-radius: 999px; font-size: 12px; font-weight: 650; text-transform: uppercase;
  letter-spacing: .04em; }
.mm-state.running { background: #dbeafe; color: #1d4ed8; }
.mm-state.stopping { background: #fef3c7; color: #92400e; }
.mm-state.stopped { background: #fef3c7; color: #92400e; }
.mm-state.finished { background: #dcfce7; color: #166534; }
.mm-state.failed { background: #fee2e2; color: #991b1b; }
.mm-state.idle { background: #f1f5f9; color: #475569; }
#mm-stop:not([disabled]) { background: #fef2f2; color: #b91c1c; border: 1px solid #fecaca; }
#mm-footer { text-align: center; font-size: 12.5px; color: var(--body-text-color-subdued); margin-top: 8px; }
#mm-chat .message-wrap { font-size: 15px; }
"""


# ---------------------------------------------------------------------------------------------
# State shared by every browser session: the loaded model and the current training run


class ModelSlot:
    """The chat model of the app (one for all sessions: models are big). ``load`` swaps it."""

    def __init__(self, backend: ChatBackend | None = None, model: str | None = None, adapter: str | None = None,
                 template: str = "auto", max_prompt_tokens: int | None = None):
        self.backend = backend
        self.model, self.adapter, self.template = model, adapter, template
        self.max_prompt_tokens = max_prompt_tokens
        self._lock = threading.Lock()

    def load(self, model: str, adapter: str | None = None) -> ChatBackend:
        with self._lock:
            backend = load_chat_model(model, adapter or None, self.template, max_prompt_tokens=self.max_prompt_tokens)
            self.backend, self.model, self.adapter = backend, model, adapter or None
            return backend


class JobSlot:
    """The current (or last) training run."""

    def __init__(self) -> None:
        self.job: TrainJob | None = None


# ---------------------------------------------------------------------------------------------
# Rendering helpers (plain functions of plain data, so they are testable without a browser)


def header_html(slot: ModelSlot) -> str:
    pills = ""
    b = slot.backend
    if b is not None:
        info = b.describe()
        pills = (f'<span class="mm-pill">model: {html.escape(info["name"])}</span>'
                 f'<span class="mm-pill">{" + ".join(info["modalities"])}</span>'
                 + (f'<span class="mm-pill">context {info["context_length"]}</span>' if info["context_length"] else ""))
    else:
        pills = '<span class="mm-pill">no model loaded</span>'
    return ('<div id="mm-header"><div class="mm-logo">mm</div><div><h1>mmtune</h1>'
            "<p>Chat with your tuned models, watch training live, read the reports.</p></div>"
            f'<div class="mm-spacer"></div><div>{pills}</div></div>')


def route_html(route: str | None, loaded: bool = True) -> str:
    if not loaded:
        return '<span class="mm-badge"><span class="mm-dot off"></span>No model loaded</span>'
    return (f'<span class="mm-badge" id="mm-route"><span class="mm-dot"></span>Answering: '
            f"<b>{html.escape(route or BASE_MODEL)}</b></span>")


def model_info_md(slot: ModelSlot) -> str:
    b = slot.backend
    if b is None:
        return "No model loaded yet: enter a model directory (or `builtin:tiny`) and press **Load model**."
    info = b.describe()
    lines = [f"**{info['name']}**", "", f"- inputs: {', '.join(info['modalities'])}",
             f"- context: {info['context_length'] or 'unknown'} tokens", f"- adapter: {info['adapter']}"]
    if "image" not in b.modalities:
        lines.append("- no vision or audio encoder: attachments are answered with a note")
    return "\n".join(lines)


def chat_messages(history: list[dict]) -> list[dict]:
    """Conversation state -> gradio Chatbot messages (attachments as files, notes as a quote
    above the reply)."""
    msgs: list[dict] = []
    for t in history:
        if t["role"] == "user":
            for p in [*t.get("images", []), *t.get("audios", [])]:
                msgs.append({"role": "user", "content": {"path": p}})
            if t.get("text"):
                msgs.append({"role": "user", "content": t["text"]})
        else:
            notes = "".join(f"> ℹ️ {note}\n\n" for note in t.get("notes", []))
            msgs.append({"role": "assistant", "content": notes + t.get("text", "")})
    return msgs


def reply_to(backend: ChatBackend, history: list[dict], system_text: str, settings: GenerationSettings) -> Reply:
    """The reply to the chat tab's conversation (``history``: its ``{"role", "text", "images",
    "audios"}`` entries): a :class:`~mmtune.inference.session.ChatSession` over it, not strict
    (attachments the model cannot see get a note), so a conversation longer than the context
    loses its oldest exchanges as in the terminal chat."""
    turns = [Turn(h["role"], h["text"], list(h.get("images", [])), list(h.get("audios", []))) for h in history]
    return ChatSession(backend, turns, system_prompt=(system_text or "").strip() or None).respond(settings)


def progress_html(job: TrainJob | None, rows: list[dict] | None = None) -> str:
    if job is None:
        return ('<div class="mm-progress"><div class="mm-progress-top"><span class="mm-state idle">idle</span>'
                '<span class="mm-muted">No run yet: pick a recipe and press Start training.</span></div>'
                '<div class="mm-bar"><div class="mm-fill" style="width:0%"></div></div></div>')
    p = job.progress(rows)
    total = p.total if p.total is not None else "?"
    bits = []
    if p.loss is not None:
        bits.append(f"loss {p.loss:.4f}")
    if p.eval_loss is not None:
        bits.append(f"eval loss {p.eval_loss:.4f}")
    minutes, seconds = divmod(int(p.elapsed), 60)
    bits.append(f"{minutes:02d}:{seconds:02d}")
    if p.step == 0 and p.state == "running":
        bits.insert(0, "preparing data and model")
    return (f'<div class="mm-progress" id="mm-progress"><div class="mm-progress-top">'
            f'<span class="mm-state {p.state}">{p.state}</span>'
            f'<span class="mm-steps">step {p.step} / {total}</span>'
            f'<span class="mm-muted">{html.escape(" · ".join(bits))}</span>'
            f'<span class="mm-muted">{html.escape(str(job.output_dir))}</span></div>'
            f'<div class="mm-bar"><div class="mm-fill" style="width:{100 * p.fraction:.1f}%"></div></div></div>')


def loss_frames(rows: list[dict]):
    """(training-loss frame, eval-loss frame) for the charts; None for a curve with no point
    yet (an empty frame has no numeric dtype, and the chart would take its axis as categories)."""
    import pandas as pd

    def frame(key: str, name: str):
        pts = [(int(r["step"]), float(r[key])) for r in rows if key in r and "step" in r]
        if not pts:
            return None
        return pd.DataFrame(pts, columns=["step", name]).astype({"step": "int64", name: "float64"})

    return frame("loss", "loss"), frame("eval_loss", "eval loss")


def job_status_md(job: TrainJob | None) -> str:
    if job is None:
        return ""
    if job.state == "failed":
        return f"**Run failed:** {job.error}"
    if job.state in ("finished", "stopped"):
        where = job.chat_dir() or job.output_dir
        return (f"**Run {job.state}.** Weights: `{where}`. Resume with `mmtune train {job.source} --resume`, "
                "or chat with the result below.")
    if job.state == "stopping":
        return "Stopping after the current step; a checkpoint will be saved."
    note = "" if job.can_stop else " (this objective cannot be stopped early)"
    return f"Training **{job.source}** → `{job.output_dir}`{note}"


def train_recipes() -> list[str]:
    """Shipped recipes that `mmtune train` runs (continual-learning recipes run with `mmtune continual`)."""

    names = []
    for name in list_recipes():
        try:
            if "continual" not in load_yaml(RECIPE_DIR / f"{name}.yaml"):
                names.append(name)
        except MMTuneError:
            continue
    return names


def recipe_text(name_or_path: str) -> str:

    try:
        return resolve_recipe_path(name_or_path).read_text(encoding="utf-8")
    except (MMTuneError, OSError) as e:
        return f"# {e}"


def parse_overrides(text: str) -> list[str]:
    """One dotted ``key=value`` per line (or several separated by spaces); ``#`` starts a comment."""
    out = []
    for line in (text or "").splitlines():
        line = line.split("#", 1)[0].strip()
        out.extend(x for x in line.split() if x)
    return out


# ---------------------------------------------------------------------------------------------
# The app


@dataclass
class ChatTab:
    """The Chat tab's components that other parts of the page update (the Train tab's "Chat with
    the trained model" loads the result into them)."""

    route: object
    model_box: object
    adapter_box: object
    model_info: object


def chat_tab(gr, slot: ModelSlot, header, model: str | None, adapter: str | None) -> ChatTab:
    """The Chat tab's components and events (inside its ``gr.Tab``): conversation, attachments,
    the answering adapter's label, model loading and the generation settings."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            route = gr.HTML(route_html(slot.backend.default_route() if slot.backend else None,
                                       slot.backend is not None))
            chatbot = gr.Chatbot(elem_id="mm-chat", height=540, show_label=False, layout="bubble",
                                 buttons=["copy"], feedback_options=None,
                                 placeholder="**Start a conversation.** Attach an image or an audio "
                                 "clip with the paperclip; replies stream as they are generated.")
            msg = gr.MultimodalTextbox(show_label=False, file_types=["image", "audio"],
                                       file_count="multiple", sources=["upload", "microphone"],
                                       placeholder="Message the model, or attach an image / audio file…",
                                       stop_btn=True, autofocus=True, elem_id="mm-input")
            with gr.Row():
                clear = gr.Button("New conversation", size="sm", variant="secondary", scale=0,
                                  min_width=170, elem_id="mm-clear")
        with gr.Column(scale=1, min_width=290):
            with gr.Accordion("Model", open=slot.backend is None):
                model_box = gr.Textbox(label="Model directory", value=model or "builtin:tiny",
                                       info="base, merged, adapter, checkpoint, composed model "
                                       "or builtin:tiny")
                adapter_box = gr.Textbox(label="Adapter (optional)", value=adapter or "",
                                         placeholder="runs/my-run/final")
                load_btn = gr.Button("Load model", variant="primary", size="sm")
                model_info = gr.Markdown(model_info_md(slot))
            with gr.Accordion("Generation", open=True):
                system = gr.Textbox(label="System prompt", lines=3,
                                    placeholder="You are a helpful assistant.")
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature",
                                        info="0 = greedy (deterministic)")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                max_tokens = gr.Slider(16, 2048, value=256, step=16, label="Max new tokens")
                seed = gr.Textbox(label="Seed", value="", placeholder="random", max_lines=1,
                                  info="an integer makes sampling repeatable; blank = random")
    history = gr.State([])

    def add_user(value, hist):
        value = value or {}
        text = (value.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in value.get("files") or []]
        images, audios, others = split_attachments([f for f in files if f])
        for o in others:
            gr.Warning(f"{Path(o).name} is neither an image nor audio; it was not sent.")
        if not text and not images and not audios:
            return gr.MultimodalTextbox(value=None), chat_messages(hist), hist
        hist = [*hist, {"role": "user", "text": text, "images": images, "audios": audios}]
        return gr.MultimodalTextbox(value=None, interactive=False), chat_messages(hist), hist

    def respond(hist, system_text, temp, topp, max_new, seed_value):
        if not hist or hist[-1]["role"] != "user":
            yield chat_messages(hist), hist, gr.skip()
            return
        b = slot.backend
        if b is None:
            hist = [*hist, {"role": "assistant", "text": "No model is loaded: enter a model directory on the "
                            "right and press **Load model**.", "notes": []}]
            yield chat_messages(hist), hist, route_html(None, False)
            return
        seed_text = str(seed_value or "").strip()
        if seed_text and not seed_text.lstrip("-").isdigit():
            gr.Warning(f"Seed {seed_text!r} is not an integer: sampling with a random seed.")
        settings = GenerationSettings(int(max_new), float(temp), float(topp),
                                      int(seed_text) if seed_text.lstrip("-").isdigit() else None)
        try:
            reply = reply_to(b, hist, system_text, settings)
        except MMTuneError as e:
            hist = [*hist, {"role": "assistant", "text": f"⚠️ {e}", "notes": []}]
            yield chat_messages(hist), hist, gr.skip()
            return
        entry = {"role": "assistant", "text": "", "notes": list(reply.notes), "route": reply.route}
        hist = [*hist, entry]
        yield chat_messages(hist), hist, route_html(reply.route)
        try:
            for piece in reply:
                entry["text"] += piece
                yield chat_messages(hist), hist, gr.skip()
        finally:
            reply.close()
        if not entry["text"].strip():
            entry["text"] = "*(the model ended its turn without text)*"
            yield chat_messages(hist), hist, gr.skip()

    submit = msg.submit(add_user, [msg, history], [msg, chatbot, history], queue=False)
    reply_event = submit.then(respond, [history, system, temperature, top_p, max_tokens, seed],
                              [chatbot, history, route], show_progress="hidden")
    reply_event.then(lambda: gr.MultimodalTextbox(interactive=True), None, [msg], queue=False)
    msg.stop(lambda: gr.MultimodalTextbox(interactive=True), None, [msg], cancels=[reply_event], queue=False)
    clear.click(lambda: ([], [], gr.MultimodalTextbox(value=None, interactive=True)), None,
                [chatbot, history, msg], queue=False)

    def load_model(model_dir, adapter_dir):
        model_dir = (model_dir or "").strip()
        if not model_dir:
            gr.Warning("Enter a model directory (or builtin:tiny).")
            return gr.skip(), gr.skip(), gr.skip()
        try:
            b = slot.load(model_dir, (adapter_dir or "").strip() or None)
        except MMTuneError as e:
            gr.Warning(str(e))
            return gr.skip(), f"**Could not load:** {e}", gr.skip()
        gr.Info(f"Loaded {b.name}")
        return header_html(slot), model_info_md(slot), route_html(b.default_route())

    load_btn.click(load_model, [model_box, adapter_box], [header, model_info, route])
    return ChatTab(route, model_box, adapter_box, model_info)


def train_tab(gr, slot: ModelSlot, jobs: JobSlot, header, chat: ChatTab, tabs, recipes: list[str],
              default_recipe: str) -> None:
    """The Train tab's components and events (inside its ``gr.Tab``): recipe and overrides, start /
    stop, the progress bar, loss charts, sample generations and the log, polled once a second."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            recipe = gr.Dropdown(recipes, value=default_recipe or None, label="Recipe",
                                 allow_custom_value=True, elem_id="mm-recipe",
                                 info="a shipped recipe, or the path of a YAML file")
            overrides = gr.Textbox(label="Overrides", lines=3, elem_id="mm-overrides",
                                   placeholder="train.max_steps=100\ntrain.output_dir=runs/my-run",
                                   info="dotted key=value, one per line")
            with gr.Row():
                resume = gr.Checkbox(label="Resume", value=False,
                                     info="continue from the latest checkpoint")
                overwrite = gr.Checkbox(label="Overwrite", value=False,
                                        info="start over in a used output dir")
            with gr.Row():
                start_btn = gr.Button("Start training", variant="primary", elem_id="mm-start")
                stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="mm-stop")
            train_status = gr.Markdown(elem_id="mm-train-status")
            chat_btn = gr.Button("Chat with the trained model", visible=False, elem_id="mm-chat-result")
            with gr.Accordion("Recipe file", open=False):
                recipe_view = gr.Code(recipe_text(default_recipe) if default_recipe else "",
                                      language="yaml", lines=14, interactive=False, show_label=False)
        with gr.Column(scale=3):
            progress = gr.HTML(progress_html(None))
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=260,
                                        x_title="step", y_title="loss")
                eval_plot = gr.LinePlot(x="step", y="eval loss", title="Eval loss", height=260,
                                        x_title="step", y_title="eval loss")
            samples = gr.Dataframe(headers=["step", "prompt", "output"], label="Sample generations",
                                   wrap=True, interactive=False, max_height=260,
                                   column_widths=["10%", "35%", "55%"])
            with gr.Accordion("Log", open=False):
                log_box = gr.Textbox(show_label=False, lines=12, max_lines=12, autoscroll=True,
                                     interactive=False)
    seen = gr.State({"rows": -1, "state": None, "lines": -1})
    timer = gr.Timer(1.0)

    def start_training(recipe_name, override_text, do_resume, do_overwrite):

        if jobs.job is not None and jobs.job.alive:
            gr.Warning("A run is already going: stop it first.")
            return gr.skip(), gr.skip(), gr.skip()
        if not recipe_name:
            return "Pick a recipe first.", gr.skip(), gr.skip()
        try:
            rec = load_recipe(recipe_name, parse_overrides(override_text))
            if rec.continual is not None:
                raise MMTuneError(f"{recipe_name} is a continual-learning recipe: run it with "
                                  f"`mmtune continual {recipe_name}`; its report then shows under Reports")
        except MMTuneError as e:
            return f"**Cannot start:** {e}", gr.skip(), gr.skip()
        jobs.job = TrainJob(rec, resume=bool(do_resume), overwrite=bool(do_overwrite), source=recipe_name).start()
        return job_status_md(jobs.job), gr.Button(interactive=False), gr.Button(interactive=jobs.job.can_stop)

    def stop_training():
        job = jobs.job
        if job is None or not job.stop():
            return gr.skip(), gr.skip()
        return job_status_md(job), gr.Button(interactive=False)

    def refresh(seen_state):
        """Timer tick: redraw only what changed since this session last looked."""
        job = jobs.job
        if job is None:
            return (gr.skip(),) * 9 + (seen_state,)
        rows = job.metrics()
        changed = len(rows) != seen_state["rows"] or job.state != seen_state["state"]
        out = [progress_html(job, rows)]
        if changed:
            train_df, eval_df = loss_frames(rows)
            out += [train_df, eval_df, job.samples(rows)]
        else:
            out += [gr.skip()] * 3
        out.append("\n".join(job.lines) if changed or len(job.lines) != seen_state["lines"] else gr.skip())
        if job.state != seen_state["state"]:
            running = job.alive
            out += [job_status_md(job), gr.Button(interactive=not running),
                    gr.Button(interactive=running and job.can_stop and job.state == "running"),
                    gr.Button(visible=not running and job.chat_dir() is not None)]
        else:
            out += [gr.skip()] * 4
        return (*out, {"rows": len(rows), "state": job.state, "lines": len(job.lines)})

    def chat_with_result():
        job = jobs.job
        target = job.chat_dir() if job is not None else None
        if target is None:
            gr.Warning("The run has no final weights yet.")
            return (gr.skip(),) * 6
        try:
            b = slot.load(str(target))
        except MMTuneError as e:
            gr.Warning(str(e))
            return (gr.skip(),) * 6
        gr.Info(f"Loaded {b.name}")
        return (header_html(slot), model_info_md(slot), route_html(b.default_route()), str(target),
                "", gr.Tabs(selected="chat"))

    recipe.change(recipe_text, [recipe], [recipe_view], queue=False)
    start_btn.click(start_training, [recipe, overrides, resume, overwrite], [train_status, start_btn, stop_btn])
    stop_btn.click(stop_training, None, [train_status, stop_btn])
    timer.tick(refresh, [seen], [progress, loss_plot, eval_plot, samples, log_box, train_status, start_btn,
                                 stop_btn, chat_btn, seen], show_progress="hidden")
    chat_btn.click(chat_with_result, None,
                   [header, chat.model_info, chat.route, chat.model_box, chat.adapter_box, tabs])


def reports_tab(gr, app, runs_dir: str) -> None:
    """The Reports tab's components and events (inside its ``gr.Tab``): every report.md below the
    runs directory, its figures and metrics; scanned when the page loads."""
    with gr.Row():
        root_box = gr.Textbox(value=runs_dir, label="Runs directory", scale=4,
                              info="every directory below it with a report.md (demo, continual)")
        scan_btn = gr.Button("Scan", scale=1)
    report_pick = gr.Dropdown([], label="Report", interactive=True)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            report_md = gr.Markdown("Run `mmtune demo` or `mmtune continual RECIPE`, then press Scan.",
                                    elem_id="mm-report")
        with gr.Column(scale=2):
            report_json = gr.JSON(label="Metrics", open=True, visible=False)
            report_imgs = gr.Gallery(label="More figures", columns=1, height="auto", object_fit="contain",
                                     visible=False)

    def scan(root):
        root_path = Path(root or ".").expanduser()
        found = find_reports(root_path)
        if not found:
            return (gr.Dropdown(choices=[], value=None),
                    f"No report.md under `{root_path}` yet: run `mmtune demo` or `mmtune continual RECIPE`.",
                    gr.JSON(value=None, visible=False), gr.Gallery(value=None, visible=False))
        choices = [(report_label(d, root_path), str(d)) for d in found]
        return (gr.Dropdown(choices=choices, value=choices[0][1]), *show_report(str(found[0])))

    def show_report(path):
        if not path:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            rep = read_report(path)
        except OSError as e:
            return f"Cannot read {path}: {e}", gr.JSON(visible=False), gr.Gallery(visible=False)
        return (rep.markdown, gr.JSON(value=rep.metrics, visible=rep.metrics is not None),
                gr.Gallery(value=[(str(p), p.stem.replace("_", " ")) for p in rep.unlinked] or None,
                           visible=bool(rep.unlinked)))

    scan_btn.click(scan, [root_box], [report_pick, report_md, report_json, report_imgs])
    root_box.submit(scan, [root_box], [report_pick, report_md, report_json, report_imgs])
    report_pick.input(show_report, [report_pick], [report_md, report_json, report_imgs])
    app.load(scan, [root_box], [report_pick, report_md, report_json, report_imgs])


def build_app(model: str | None = None, adapter: str | None = None, *, template: str = "auto",
              runs_dir: str = "runs", backend: ChatBackend | None = None, max_prompt_tokens: int | None = None,
              default_recipe: str = "quickstart"):
    """The gradio Blocks app. ``model``/``adapter`` are loaded now (errors surface at start-up);
    ``backend`` serves instead when given (tests, embedding)."""

    gr = require("gradio", "mmtune web")

    slot = ModelSlot(backend, model, adapter, template, max_prompt_tokens)
    if backend is None and model:
        slot.load(model, adapter)
    jobs = JobSlot()
    recipes = train_recipes()
    if default_recipe not in recipes:
        default_recipe = recipes[0] if recipes else ""

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        header = gr.HTML(header_html(slot))
        with gr.Tabs(selected="chat") as tabs:
            with gr.Tab("Chat", id="chat"):
                chat = chat_tab(gr, slot, header, model, adapter)
            with gr.Tab("Train", id="train"):
                train_tab(gr, slot, jobs, header, chat, tabs, recipes, default_recipe)
            with gr.Tab("Reports", id="reports"):
                reports_tab(gr, app, runs_dir)
        gr.HTML('<div id="mm-footer">mmtune web · OpenAI-compatible API for the same models: '
                "<code>mmtune serve MODEL_DIR</code></div>")
    app.mmtune_slot, app.mmtune_jobs = slot, jobs  # for tests and embedding
    return app


def theme():
    import gradio as gr

    # Soft with plain field titles (its default puts every title on a coloured pill).
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="violet", neutral_hue="slate").set(
        block_title_background_fill="none", block_title_padding="0", block_title_text_color="*neutral_700",
        block_title_text_color_dark="*neutral_200", block_label_background_fill="*neutral_50")


def launch(model: str | None = None, adapter: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
           *, template: str = "auto", runs_dir: str = "runs", max_prompt_tokens: int | None = None,
           backend: ChatBackend | None = None, prevent_thread_lock: bool = False, log=print):
    """Build the app and serve it at ``http://host:port`` (never a public share link).

    ``backend`` serves instead of loading ``model`` (embedding, tests). With
    ``prevent_thread_lock`` the call returns once the server is up; ``app.close()`` stops it.
    """
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if model and backend is None:
        log(f"loading {model}" + (f" with adapter {adapter}" if adapter else ""))
    app = build_app(model, adapter, template=template, runs_dir=runs_dir, backend=backend,
                    max_prompt_tokens=max_prompt_tokens)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: serving on {host}: anyone who can reach this port can use the model and start training")
    # Report figures are inlined and uploads live in gradio's own cache: no other path is served.
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=False, show_error=True, ssr_mode=False, theme=theme(),
               css=CSS, prevent_thread_lock=prevent_thread_lock, quiet=False, footer_links=["gradio", "settings"])
    return app


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``mmtune web`` (shared with ``python -m mmtune.serve.web``)."""
    p.add_argument("--model", help="model to chat with: base, merged, exported adapter, training checkpoint, a "
                   "composed multimodal model, or builtin:tiny (default: none; load one in the page)")
    p.add_argument("--adapter", help="LoRA adapter dir to load on top of --model")
    p.add_argument("--template", default="auto", help="chat template (default: the one saved with the model)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--runs-dir", default="runs", help="where the Reports tab looks for report.md (default runs)")
    p.add_argument("--max-prompt-tokens", type=int, help="refuse prompts longer than this (default: the model's "
                   "context length)")


def run_from_args(args: argparse.Namespace) -> None:
    launch(args.model, args.adapter, args.host, args.port, template=args.template, runs_dir=args.runs_dir,
           max_prompt_tokens=args.max_prompt_tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmtune web", description="Chat, train and read reports in the browser.")
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        run_from_args(args)
    except MMTuneError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
