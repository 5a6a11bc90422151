"""What a model reads, apart from how the sampler writes: teacher-forced accuracy of chosen words.

Each question's reference answer is laid on the canvas after its prompt, as training lays it (the
answer's tokens, then the padding token to ``gen_length``), and only the positions holding one of
the chosen words are masked. One forward pass predicts them; the word is read right when the argmax
is the reference token. For the synthetic reports, the size words (``small``, ``large``) ask "does
the model see each lesion's size?" with every other word given, so a low score is the model's
reading and a high score with poor sampled reports is the sampler's order of commitment
(docs/mini_recipe.md, "What the reading needed").

    python -m medv_jax.evaluate probe-words --questions reports200/questions.jsonl \\
        --image_folder reports200 --checkpoint workdir/mini/stage2_instruct/model \\
        --tokenizer workdir/mini/stage2_instruct/tokenizer --system_prompt none --words small large

``--format caption`` probes a stage-1 model on its own format (LLaVA's plain captions: the image
slots, then the caption and a newline, EOS padding; the reference is the scan's synthetic caption).
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
from typing import Any, Mapping, Sequence

import numpy as np

from medv_jax.data import pipeline, synthetic
from medv_jax.data import tokenizer as tok_lib
from medv_jax.data.records import load_records, write_json
from medv_jax.user_errors import UserError

__all__ = ["FORMATS", "reference_canvas", "word_ids", "predict_masked", "probe_words", "add_arguments", "run"]

FORMATS = ("chat", "caption")


def word_ids(tokenizer: Any, words: Sequence[str]) -> set[int]:
    """Token ids a word is written as, alone or after a space; a word of several tokens is an error
    (the probe masks whole words as single positions)."""
    ids: set[int] = set()
    for word in words:
        for text in (word, " " + word):
            found = tok_lib.encode(tokenizer, text)
            if len(found) != 1:
                raise UserError(f"--words {word!r}: the tokenizer writes {text!r} as {len(found)} tokens; "
                                "probe words of one token each")
            ids.add(found[0])
    return ids


def reference_canvas(tokenizer: Any, answer: str, gen_length: int, pad_id: int, closing: str) -> list[int]:
    """The canvas training shows for ``answer``: its tokens, ``closing`` (the chat turn's end or a
    caption's newline), then ``pad_id`` up to ``gen_length``."""
    ids = tok_lib.encode(tokenizer, answer) + tok_lib.encode(tokenizer, closing)
    if len(ids) > gen_length:
        raise UserError(f"a reference answer takes {len(ids)} tokens, more than --gen_length {gen_length}")
    return ids + [pad_id] * (gen_length - len(ids))


def _reference_of(tokenizer: Any, row: Mapping[str, Any], answer_format: str, gen_length: int,
                  padding: str = "eot") -> list[int]:
    """``reference_canvas`` of a question row in ``answer_format``, a chat answer padded with
    ``padding`` ("eot" or "eos", as the model trained: data.answer_padding); errors name the question."""
    specials = tok_lib.special_token_ids(tokenizer)
    try:
        if answer_format == "caption":
            return reference_canvas(tokenizer, synthetic.caption(_scene(row)), gen_length, specials.eos, "\n")
        return reference_canvas(tokenizer, row["answer"], gen_length, pipeline.padding_token_id(tokenizer, padding),
                                tok_lib.EOT_TOKEN)
    except UserError as e:
        raise UserError(f"question {row.get('question_id')!r}: {e}") from None


def _prompt_row(model: Any, row: Mapping[str, Any], image: Any, answer_format: str) -> Any:
    from medv_jax.data import conversation as conv
    from medv_jax.sampling import multimodal as mm

    if answer_format == "caption":
        sample = conv.format_caption_prompt({"id": str(row["question_id"]), "conversations": []}, model.tokenizer,
                                            num_image_tokens=image.layout.num_tokens)
        return mm.PromptRow(np.asarray(sample.input_ids, np.int32), np.asarray(sample.image_mask, bool), image)
    return model.prompt(row["text"], image)


def predict_masked(model: Any, prompts: Sequence[Any], canvases: Sequence[np.ndarray]) -> np.ndarray:
    """Argmax predictions [N, L] over the canvases laid after their prompts (``PromptRow``s), the
    rows left-padded into one batch as the sampler pads them."""
    from medv_jax.sampling import multimodal as mm

    length = len(canvases[0])
    rows = [mm.PromptRow(np.concatenate([np.asarray(p.tokens, np.int32), np.asarray(c, np.int32)]),
                         np.concatenate([np.asarray(p.image_mask, bool), np.zeros(length, bool)]), p.image)
            for p, c in zip(prompts, canvases)]
    batch = mm.collate_prompts(rows, pad_id=model.lm.eos_token_id, crop_size=model.config.vision.image_size,
                               max_crops=model.max_crops)
    predicted = _argmax_program(model.config)(model.params, batch.tokens, batch.pixels, batch.image_index,
                                              batch.image_weight, batch.image_newline_mask, batch.key_mask)
    return np.asarray(predicted)[:, -length:]


@functools.lru_cache(maxsize=4)
def _argmax_program(config: Any) -> Any:
    import jax

    from medv_jax.models.medv import MedV

    def argmax(params, *inputs):
        return jax.numpy.argmax(MedV(config).apply({"params": params}, *inputs), axis=-1)

    return jax.jit(argmax)


def probe_words(
    model: Any,
    rows: Sequence[Mapping[str, Any]],
    words: Sequence[str],
    *,
    image_folder: str = "",
    answer_format: str = "chat",
    gen_length: int = 96,
    batch_size: int = 50,
    padding: str = "eot",
) -> dict[str, Any]:
    """Teacher-forced accuracy of ``words`` in the references of question ``rows`` (each with
    ``image``, ``text``, ``answer``; ``meta`` too for ``answer_format="caption"``, whose reference
    is the scan's caption). Returns token accuracy (share of masked words right), row accuracy
    (share of rows with every masked word right, over rows holding one), their counts, and the row
    accuracy per ``meta`` modality when rows carry it. ``padding``: what fills a chat answer's
    canvas after its end of turn, "eot" or "eos" (the model's data.answer_padding)."""
    if answer_format not in FORMATS:
        raise UserError(f"--format {answer_format!r}: one of {FORMATS}")
    if padding not in pipeline.ANSWER_PADDINGS:
        raise UserError(f"--padding {padding!r}: one of {pipeline.ANSWER_PADDINGS}")
    if not model.takes_images:
        raise UserError("probe-words reads images: give a multimodal checkpoint")
    tok = model.tokenizer
    targets = sorted(word_ids(tok, words))
    counts: collections.Counter = collections.Counter()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts, canvases = [], []
        for row in chunk:
            image = model.image(os.path.join(image_folder, row["image"]))
            canvas = _reference_of(tok, row, answer_format, gen_length, padding)
            prompts.append(_prompt_row(model, row, image, answer_format))
            canvases.append(np.asarray(canvas, np.int32))
        shown = [np.where(np.isin(c, targets), model.lm.mask_token_id, c) for c in canvases]
        predicted = predict_masked(model, prompts, shown)
        for row, canvas, guess in zip(chunk, canvases, predicted):
            masked = np.isin(canvas, targets)
            if not masked.any():
                continue
            right = int(np.sum(guess[masked] == canvas[masked]))
            all_right = right == int(masked.sum())
            counts.update(tokens=int(masked.sum()), tokens_right=right, rows=1, rows_right=int(all_right))
            modality = row.get("meta", {}).get("modality")
            if modality is not None:
                counts.update({f"rows:{modality}": 1, f"rows_right:{modality}": int(all_right)})
    if not counts["rows"]:
        raise UserError(f"--words {' '.join(words)}: no reference answer holds any of them")
    modalities = sorted(k.split(":", 1)[1] for k in counts if k.startswith("rows:"))
    return {
        "words": list(words),
        "format": answer_format,
        "token_accuracy": 100.0 * counts["tokens_right"] / counts["tokens"],
        "row_accuracy": 100.0 * counts["rows_right"] / counts["rows"],
        "n_tokens": counts["tokens"],
        "n_rows": counts["rows"],
        "row_accuracy_by_modality": {m: 100.0 * counts[f"rows_right:{m}"] / counts[f"rows:{m}"] for m in modalities},
    }


def _scene(row: Mapping[str, Any]) -> synthetic.Scene:
    from medv_jax.evaluate.synthetic_reports import scene_of

    if "meta" not in row:
        raise UserError("--format caption needs the scan's attributes (meta), as synthetic-questions writes them")
    return scene_of(row["meta"])


def add_arguments(parser: argparse.ArgumentParser, model_flags: Any) -> None:
    """``model_flags(parser)`` adds the model flags (the evaluation command passes the shared ones)."""
    model_flags(parser)
    parser.add_argument("--questions", required=True, help="question file with image, text and answer (and meta)")
    parser.add_argument("--image_folder", default="", help="folder the questions' image paths are relative to")
    parser.add_argument("--words", nargs="+", default=["small", "large"], help="words to mask and read back")
    parser.add_argument("--format", dest="answer_format", choices=FORMATS, default="chat",
                        help="chat: the reference answer after the chat prompt; caption: a stage-1 caption")
    parser.add_argument("--gen_length", type=int, default=96, help="canvas length (the reference plus padding)")
    parser.add_argument("--padding", choices=pipeline.ANSWER_PADDINGS, default="eot",
                        help="what fills a chat answer's canvas after its end of turn: the model's "
                             "data.answer_padding (eot: configs/mini/stage2_instruct.py; eos: the other configs)")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--output", help="write the result as JSON here")


def run(args: argparse.Namespace) -> int:
    from medv_jax.evaluate import generation

    rows = load_records(args.questions)
    if not rows:
        raise UserError(f"--questions {args.questions}: no questions in it")
    rows = rows[: args.limit] if args.limit else rows
    # The words and the rows are checked against the tokenizer before the weights load.
    tokenizer = tok_lib.load_tokenizer(os.path.expanduser(args.tokenizer))
    word_ids(tokenizer, args.words)
    for row in rows:
        _reference_of(tokenizer, row, args.answer_format, args.gen_length, args.padding)
    model = generation.load_model(vars(args))
    result = probe_words(model, rows, args.words, image_folder=args.image_folder, answer_format=args.answer_format,
                         gen_length=args.gen_length, batch_size=args.batch_size, padding=args.padding)
    by = ", ".join(f"{m} {v:.1f}" for m, v in result["row_accuracy_by_modality"].items())
    print(f"{' '.join(args.words)}: {result['token_accuracy']:.1f} % of {result['n_tokens']} words right, "
          f"every one right in {result['row_accuracy']:.1f} % of {result['n_rows']} answers"
          + (f" (by modality: {by})" if by else ""))
    if args.output:
        write_json(args.output, {"questions": args.questions, **result})
    return 0
