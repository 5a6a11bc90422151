"""The gradio page: upload a scan, chat about it, watch each answer unmask.

Generation is one compiled program; the page replays the answer from the per-position commit
steps the sampler returns (``SampleOutput.commit_step``): masked positions shown as ░ filling in
step by step, then the final text. Every handler turns bad input into a message in the page
(``#status``) instead of an exception.
"""
from __future__ import annotations

import html
import os
import sys
import time
import traceback
from typing import Any, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from medv_jax.sampling.diffusion import SamplerConfig  # noqa: E402
from medv_jax.serve import engine as eng  # noqa: E402

_SENTINEL = "\ue000"  # a private-use character marks masked positions before HTML escaping

PREVIEW_SIZE = 256
CSS = """
#status .error { color: #b91c1c; font-weight: 600; }
#status .info { color: #475569; }
#canvas .canvas { font-family: ui-monospace, Consolas, monospace; white-space: pre-wrap;
  word-break: break-word; padding: 0.5em; border: 1px solid #cbd5e1; border-radius: 6px;
  min-height: 2.5em; }
#canvas .mask { color: #64748b; background: #e2e8f0; }
"""


def load_upload(model: eng.Model, path: str | None, window: str) -> tuple[Any, Any, str]:
    """(preview, image state, status HTML) of an uploaded file. A file that cannot be read leaves
    a RejectedImage as the state, so the next question is refused rather than answered without
    the image."""
    if not path:
        return None, None, info_html("No image: questions are asked without one.")
    name = os.path.basename(path)
    try:
        rgb, image = eng.load_image(model, path, window)
    except eng.UserError as e:
        return None, eng.RejectedImage(name, str(e)), error_html(e)
    except Exception as e:  # never crash the page
        traceback.print_exc(file=sys.stderr)
        return None, eng.RejectedImage(name, f"{type(e).__name__}: {e}"), error_html(f"{name}: {type(e).__name__}: {e}")
    shown = rgb
    if max(rgb.size) < PREVIEW_SIZE:  # small scans: enlarge the preview (pixels kept sharp)
        scale = PREVIEW_SIZE / max(rgb.size)
        shown = rgb.resize((round(rgb.size[0] * scale), round(rgb.size[1] * scale)), Image.NEAREST)
    note = f"Loaded {name} ({rgb.size[0]}x{rgb.size[1]}, {image.layout.num_tokens} image tokens)."
    return shown, image, info_html(note + " Ask a question.")


def error_html(message: str) -> str:
    return f'<div class="error">Error: {html.escape(str(message))}</div>'


def info_html(message: str) -> str:
    return f'<div class="info">{html.escape(message)}</div>'


def canvas_html(model: eng.Model, frame: Sequence[int | None] | None, caption: str = "") -> str:
    """One replayed canvas as HTML: committed text, masked positions as grey ░."""
    if frame is None:
        body = ""
    else:
        text = html.escape(eng.render_frame(model, frame, _SENTINEL))
        body = text.replace(_SENTINEL, f'<span class="mask">{eng.MASK_GLYPH}</span>')
    cap = f'<div class="info">{html.escape(caption)}</div>' if caption else ""
    return f'{cap}<div class="canvas">{body}</div>'


def final_text(answer: eng.Answer) -> str:
    """The chat bubble of a finished answer."""
    return answer.text if answer.text else "(empty answer: end of turn at the first position)"


def stats_markdown(a: eng.Answer) -> str:
    compiled = (
        f" · compile {a.compile_s:.2f} s (first use of this prompt length / schedule)" if a.compile_s else ""
    )
    return (
        f"Steps used **{a.steps_used}** of {a.steps_scheduled} · answer tokens **{len(a.token_ids)}** · "
        f"**{a.tokens_per_s:.1f} tokens/s** · time **{a.sample_s:.3f} s**{compiled} · "
        f"prompt {a.prompt_tokens} tokens (padded to {a.prompt_length})"
    )


LABELS = {"temperature": "temperature (0 = greedy)", "cfg_scale": "cfg_scale (guidance)"}


def setting_widget(setting: eng.Setting):
    """A page widget for one sampler setting, chosen by the type of its default."""
    label = LABELS.get(setting.name, setting.name)
    if setting.help:
        label = f"{label} ({setting.help})"
    kw = dict(label=label, elem_id="set_" + setting.name.replace(".", "_"))
    value = setting.default
    if isinstance(value, bool):
        return gr.Checkbox(value=value, **kw)
    if isinstance(value, int):
        return gr.Number(value=value, precision=0, **kw)
    if isinstance(value, float):
        return gr.Number(value=value, **kw)
    if setting.choices:
        return gr.Dropdown(list(setting.choices), value=value, **kw)
    return gr.Textbox(value="" if value is None else str(value), **kw)


def build_app(
    engine: eng.Engine,
    *,
    defaults: SamplerConfig = SamplerConfig(),
    seed: int = 0,
    examples: Sequence[Sequence[str]] = (),
    replay_seconds: float = 2.0,
    startup_note: str = "",
) -> gr.Blocks:
    """The page for ``engine``; ``defaults`` (and ``seed``) are the settings it opens with (and its
    "start-up" preset), ``examples`` rows of [file, question, DICOM window]. ``replay_seconds``: how long
    the unmasking replay of one answer takes (0: show only the final answer)."""
    model = engine.model
    presets = dict(eng.PRESETS)
    presets[f"Start-up: {defaults.gen_length} / {defaults.block_length} / {defaults.steps}"] = dict(
        gen_length=defaults.gen_length, block_length=defaults.block_length, steps=defaults.steps
    )
    kind = "MedV (image + text)" if model.takes_images else "LLaDA (text only)"
    image_note = (
        f", images {model.config.vision.image_size}px ({model.image_config.aspect_ratio})"
        if model.takes_images
        else ""
    )

    with gr.Blocks(title="LLaDA-MedV demo", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## LLaDA-MedV — chat with a medical image and watch the answer unmask\n"
            f"Model `{model.name}`: {kind}{image_note}, {model.lm.max_position_embeddings} positions. "
            f"{startup_note}"
        )
        image_state = gr.State(None)  # PreprocessedImage | None
        history_state = gr.State([])  # [(question, answer)]
        frames_state = gr.State([])  # [canvas HTML] of the last answer
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Image (PNG, JPEG, ... or DICOM .dcm)", type="filepath", elem_id="upload"
                )
                window = gr.Dropdown(
                    choices=list(eng.DICOM_WINDOWS),
                    value="auto",
                    allow_custom_value=True,
                    label="DICOM window (or type center,width)",
                    elem_id="window",
                )
                preview = gr.Image(
                    label="Loaded image (DICOM: after windowing)",
                    type="pil",
                    interactive=False,
                    elem_id="preview",
                    height=260,
                )
            with gr.Column(scale=2):
                chat = gr.Chatbot(value=[], label="Chat", elem_id="chat", height=300)
                status = gr.HTML(info_html("Upload an image (or pick an example), then ask."), elem_id="status")
                with gr.Row():
                    question = gr.Textbox(
                        label="Question", placeholder="e.g. What modality is this?", elem_id="question", scale=4
                    )
                    ask = gr.Button("Ask", variant="primary", elem_id="ask", scale=1)
                    clear = gr.Button("New chat", elem_id="clear", scale=1)
                canvas = gr.HTML(canvas_html(model, None), label="Denoising canvas", elem_id="canvas")
                stats = gr.Markdown("", elem_id="stats")
                replay = gr.Slider(
                    1, 2, value=1, step=1, label="Replay: canvas after step", visible=False, elem_id="replay"
                )
        with gr.Accordion("Sampler settings", open=True):
            with gr.Row():
                preset_buttons = [(gr.Button(name, size="sm"), values) for name, values in presets.items()]
            settings = eng.settings_of(defaults)
            widgets: dict[str, Any] = {}
            groups = dict.fromkeys(st.parent for st in settings if st.parent)
            with gr.Row():
                for st in settings:
                    if st.parent is None and st.name not in groups:
                        widgets[st.name] = setting_widget(st)
                seed = gr.Number(seed, label="seed", precision=0, elem_id="set_seed")
            for group in groups:  # fast modes: a switch and its parameters per row
                with gr.Row():
                    for st in settings:
                        if st.name == group or st.parent == group:
                            widgets[st.name] = setting_widget(st)
        if examples:
            gr.Examples(
                examples=[list(r) for r in examples],
                inputs=[upload, question, window],
                label="Examples (synthetic test-set scans; pydicom's CT / MR test files)",
            )

        settings_names = [st.name for st in settings]
        settings_inputs = [widgets[name] for name in settings_names]
        gen_length, block_length, steps = widgets["gen_length"], widgets["block_length"], widgets["steps"]

        # ------------------------------------------------------------------ handlers
        def on_upload(path, window_choice):
            """Load (or clear) the image; a new image starts a new chat."""
            shown, image, note = load_upload(model, path, window_choice)
            return shown, image, [], [], note

        load_outputs = [preview, image_state, chat, history_state, status]
        # Light handlers (no device work) bypass the one-at-a-time limit of generation.
        light = dict(concurrency_limit=None)
        upload.change(on_upload, [upload, window], load_outputs, **light)
        # A new window re-reads a DICOM file (a new picture: a new chat); other files ignore it.
        window.change(
            lambda path, w: on_upload(path, w) if path and eng.is_dicom(path) else (gr.skip(),) * 5,
            [upload, window],
            load_outputs,
            **light,
        )

        def on_ask(q, image, history, chat_value, seed_value, *values):
            """Generate, then stream the unmasking replay and the final answer."""
            yield (gr.skip(),) * 3 + (info_html("Generating…"),) + (gr.skip(),) * 4
            try:
                sc = eng.sampler_config_from(dict(zip(settings_names, values)))
                seed_int = eng.coerce("seed", 0 if seed_value is None else seed_value, 0)
                answer = engine.answer(history, q, image, sc, seed_int)
            except eng.UserError as e:
                yield (gr.skip(),) * 3 + (error_html(e),) + (gr.skip(),) * 4
                return
            except Exception as e:  # never crash the page
                traceback.print_exc(file=sys.stderr)
                yield (gr.skip(),) * 3 + (error_html(f"{type(e).__name__}: {e}"),) + (gr.skip(),) * 4
                return
            q = q.strip()
            chat_value = list(chat_value or []) + [{"role": "user", "content": q}]
            n = len(answer.frames)
            frames_html = [
                canvas_html(model, f, f"step {t + 1} / {n}") for t, f in enumerate(answer.frames)
            ]
            delay = replay_seconds / max(n, 1)
            if replay_seconds > 0:
                for t, frame in enumerate(answer.frames):
                    text = eng.render_frame(model, frame) or eng.MASK_GLYPH
                    bubble = chat_value + [{"role": "assistant", "content": text}]
                    yield (
                        bubble, frames_html[t], f"Unmasking: step {t + 1} / {n} …",
                        info_html("Generating…"), gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                    )
                    time.sleep(delay)
            chat_value = chat_value + [{"role": "assistant", "content": final_text(answer)}]
            history = list(history or []) + [(q, answer.text)]
            yield (
                chat_value,
                canvas_html(model, answer.frames[-1] if n else [], f"final: {n} steps"),
                stats_markdown(answer),
                info_html("Done. Ask a follow-up question, or start a new chat."),
                history,
                "",
                gr.update(minimum=1, maximum=max(n, 2), value=max(n, 1), visible=n > 1),
                frames_html,
            )

        ask_outputs = [chat, canvas, stats, status, history_state, question, replay, frames_state]
        ask_inputs = [question, image_state, history_state, chat, seed] + settings_inputs
        ask.click(on_ask, ask_inputs, ask_outputs)
        question.submit(on_ask, ask_inputs, ask_outputs)

        def on_replay(t, frames):
            if not frames:
                return gr.skip()
            t = min(max(int(t), 1), len(frames))
            return frames[t - 1]

        replay.change(on_replay, [replay, frames_state], canvas, **light)

        clear.click(
            lambda: ([], [], canvas_html(model, None), "", gr.update(visible=False), info_html("New chat.")),
            None,
            [chat, history_state, canvas, stats, replay, status],
            **light,
        )
        def preset(values):
            return lambda: (values["gen_length"], values["block_length"], values["steps"])

        for button, values in preset_buttons:
            button.click(preset(values), None, [gen_length, block_length, steps], **light)
    return demo
