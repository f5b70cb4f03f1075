"""The generation engine on the tiny model: cache, batching, sampling, stops, limits, bad input."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from services.worker.chat import TextAssembler, render_prompt
from services.worker.engine import DecoderRunner, Engine, ModelError, measure_tokens_per_s
from services.worker.generator import Generator
from services.worker.sampling import SIGNAL_TOKENS, Sampler, SamplingParams, Signal

GREEDY = SamplingParams(max_tokens=24)
PROMPTS = ["Tell me about the sea.", "Edge devices cooperate.", "What is two plus two?"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir)


@pytest.fixture
async def generator(engine: Engine):
    gen = Generator(engine, max_batch=4)
    yield gen
    await gen.close()


# --- numerics --------------------------------------------------------------------------------


def test_cached_decode_matches_full_recompute(engine: Engine) -> None:
    ids = np.random.default_rng(0).integers(3, engine.card["vocab_size"], 48)
    full = DecoderRunner(engine, slots=1, capacity=64)
    expected = [full.prefill(0, ids[: n + 1], 0).copy() for n in range(len(ids))]
    cached = DecoderRunner(engine, slots=3, capacity=64)
    cached.prefill(2, ids[:5], 0)
    cached.prefill(2, ids[5:20], 5)  # a prompt fed in two chunks
    for n in range(20, len(ids)):
        logits = cached.decode(np.array([7, 9, ids[n]]), np.array([0, 0, n]))[2]
        np.testing.assert_allclose(logits, expected[n], atol=1e-4)


async def test_int4_greedy_output_is_stable(tiny_int4_model_dir: Path) -> None:
    answers = []
    for _ in range(2):
        gen = Generator(Engine.load(tiny_int4_model_dir), max_batch=2)
        answers.append([await gen.submit(p, GREEDY).result() for p in PROMPTS])
        await gen.close()
    assert [(t, s.output_tokens) for t, s in answers[0]] == [
        (t, s.output_tokens) for t, s in answers[1]
    ]
    assert len(set("".join(t for t, _ in answers[0]))) > 3  # not a degenerate echo


async def test_batched_decoding_gives_each_request_its_solo_tokens(generator: Generator) -> None:
    params = [
        SamplingParams(max_tokens=40),
        SamplingParams(max_tokens=12, temperature=0.8, seed=1),
        SamplingParams(max_tokens=25, repetition_penalty=1.3),
    ]
    solo = [await generator.submit(p, q).result() for p, q in zip(PROMPTS, params, strict=True)]
    first = generator.submit(PROMPTS[0], params[0])
    pieces = []
    async for piece in first:  # the others join while the first is mid-way
        pieces.append(piece)
        if len(pieces) == 5:
            others = [generator.submit(p, q) for p, q in zip(PROMPTS[1:], params[1:], strict=True)]
    together = [("".join(pieces), first.stats), *[await s.result() for s in others]]
    for (text, stats), (solo_text, solo_stats) in zip(together, solo, strict=True):
        assert text == solo_text
        assert stats.output_tokens == solo_stats.output_tokens
        assert stats.finish_reason == solo_stats.finish_reason


async def test_more_requests_than_slots_wait_their_turn(engine: Engine) -> None:
    go = threading.Event()

    def clock() -> float:  # no decode step runs before `go`: no request can end before it
        go.wait()
        return time.time()

    gen = Generator(engine, max_batch=2, clock=clock)
    try:
        streams = [gen.submit(p, GREEDY) for p in PROMPTS * 2]
        assert gen.active == 6 and gen.queued >= 4  # two slots: at least four wait
    finally:
        go.set()
    results = [
        (t, s.output_tokens) for t, s in await asyncio.gather(*(s.result() for s in streams))
    ]
    assert results[:3] == results[3:]
    assert gen.active == 0
    await gen.close()


# --- limits and stops ------------------------------------------------------------------------


async def test_max_tokens_ends_with_length(generator: Generator) -> None:
    _, stats = await generator.submit(PROMPTS[0], SamplingParams(max_tokens=5)).result()
    assert (stats.output_tokens, stats.finish_reason) == (5, "length")
    assert stats.prompt_tokens > 0 and stats.ttft_ms > 0 and stats.prefill_ms > 0


async def test_stop_string_cuts_the_text(generator: Generator) -> None:
    full, _ = await generator.submit(PROMPTS[1], SamplingParams(max_tokens=40)).result()
    stop = full[10:13]
    text, stats = await generator.submit(
        PROMPTS[1], SamplingParams(max_tokens=40, stop=(stop,))
    ).result()
    assert text == full[: full.find(stop)]
    assert stats.finish_reason == "stop"


async def test_deadline_ends_generation(engine: Engine, generator: Generator) -> None:
    params = SamplingParams(max_tokens=200)
    _, past = await generator.submit(PROMPTS[0], params, deadline=time.time() - 1).result()
    assert (past.finish_reason, past.output_tokens) == ("deadline", 0)
    steps = itertools.count()  # a clock that moves one second per decode step
    gen = Generator(engine, max_batch=4, clock=lambda: float(next(steps)))
    try:
        _, soon = await gen.submit(PROMPTS[0], params, deadline=5.0).result()
    finally:
        await gen.close()
    # the step at 0 s prefills (a first token) and decodes one, those at 1-4 s one each; 5 s ends it
    assert (soon.finish_reason, soon.output_tokens) == ("deadline", 6)


async def test_cancel_ends_the_stream(generator: Generator) -> None:
    stream = generator.submit(PROMPTS[0], SamplingParams(max_tokens=200))
    async for _ in stream:
        stream.cancel()
    assert stream.stats.finish_reason == "cancelled"
    assert generator.active == 0


async def test_event_loop_keeps_running_while_decoding(engine: Engine) -> None:
    ticked = threading.Event()
    ticks = 0

    def clock() -> float:  # each decode step waits until the event loop has run once more
        if not ticked.wait(60):
            raise TimeoutError("the event loop stood still while decoding")
        ticked.clear()
        return time.time()

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            ticked.set()
            await asyncio.sleep(0.001)

    gen = Generator(engine, max_batch=4, clock=clock)
    ticker = asyncio.create_task(tick())
    try:
        _, stats = await gen.submit(PROMPTS[0], SamplingParams(max_tokens=150)).result()
    finally:
        ticker.cancel()
        await gen.close()
    # 149 steps (the first prefills and decodes): the loop ran before each, not only at the end
    assert stats.output_tokens == 150 and ticks >= 149


# --- sampling --------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy() -> None:
    logits = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    assert [Sampler(sampled, 500, [])(logits) for _ in range(3)] == [
        Sampler(sampled, 500, [])(logits)
    ] * 3
    assert Sampler(SamplingParams(temperature=1.0, top_k=1), 500, [])(logits) == int(
        logits.argmax()
    )
    assert Sampler(SamplingParams(temperature=0.7, top_p=1e-6), 500, [])(logits) == int(
        logits.argmax()
    )
    draws = {
        Sampler(SamplingParams(temperature=5.0, top_k=3, seed=s), 500, [])(logits)
        for s in range(60)
    }
    assert draws == set(np.argsort(logits)[-3:].tolist())


def test_the_gap_signal_is_the_models_own_certainty_of_its_first_tokens() -> None:
    signal = Signal()
    signal.add(np.log(np.array([0.5, 0.25, 0.25], np.float32)), 0)  # sure-ish of token 0
    signal.add(np.zeros(4, np.float32), 2)  # no idea: uniform over 4
    assert signal.confidence == pytest.approx((0.5 + 0.25) / 2, abs=1e-4)
    assert signal.entropy == pytest.approx((1.5 * np.log(2) + np.log(4)) / 2, abs=1e-4)
    # from the raw logits: a repetition penalty changes the choice, not the signal
    logits = np.zeros(10, np.float32)
    logits[[3, 4]] = [2.0, 1.9]
    sampler = Sampler(SamplingParams(repetition_penalty=1.3), 10, [3])
    assert sampler(logits) == 4
    assert sampler.signal.probs == [pytest.approx(np.exp(1.9) / (np.exp(2) + np.exp(1.9) + 8))]
    for _ in range(2 * SIGNAL_TOKENS):
        sampler(logits)
    assert len(sampler.signal.probs) == SIGNAL_TOKENS  # only the first tokens count


async def test_every_generation_reports_its_gap_signal(generator: Generator) -> None:
    _, stats = await generator.submit(PROMPTS[0], GREEDY).result()
    assert stats.confidence is not None and 0 < stats.confidence <= 1
    assert stats.entropy is not None and stats.entropy >= 0


def test_repetition_penalty_pushes_seen_tokens_down() -> None:
    logits = np.zeros(10, np.float32)
    logits[[3, 4]] = [2.0, 1.9]
    assert Sampler(SamplingParams(repetition_penalty=1.3), 10, [3])(logits) == 4


def test_top_p_reaching_past_the_candidates_uses_the_whole_distribution() -> None:
    logits = np.zeros(5000, np.float32)  # flat: 256 candidates hold ~5% of the mass
    draws = {
        Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=s), 5000, [])(logits)
        for s in range(40)
    }
    assert len(draws) > 30 and max(draws) > 256


# --- text ------------------------------------------------------------------------------------


def test_streamed_text_keeps_multibyte_characters_whole(engine: Engine) -> None:
    text = "naïve 😀 東京 ok"
    assembler = TextAssembler(engine.tokenizer, ())
    pieces = [assembler.push(t) for t in engine.encode(text)]
    assert "".join(pieces) + assembler.flush() == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_strings_are_held_back_until_decided(engine: Engine) -> None:
    assembler = TextAssembler(engine.tokenizer, ("STOP",))
    out = "".join(assembler.push(t) for t in engine.encode("abc STO then STOP more"))
    assert out == "abc STO then " and assembler.stopped


def test_chatml_prompt_adds_the_default_system_prompt(engine: Engine) -> None:
    prompt = render_prompt(engine.card, "Hi")
    assert prompt == (
        "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    own = render_prompt(
        engine.card, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>")


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    ["", "   ", [], [{"role": "user", "content": ""}], [{"role": "robot", "content": "hi"}]],
)
async def test_empty_or_malformed_prompts_are_refused(generator: Generator, messages) -> None:
    with pytest.raises(ValueError):
        generator.submit(messages, GREEDY)


async def test_prompt_longer_than_the_context_is_refused(generator: Generator) -> None:
    with pytest.raises(ValueError, match="context holds 2048"):
        generator.submit("x" * 2100, GREEDY)


@pytest.mark.parametrize("max_tokens", [0, -1, 10**9])
async def test_bad_max_tokens_is_refused(generator: Generator, max_tokens: int) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        generator.submit("hi", SamplingParams(max_tokens=max_tokens))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_sampling_parameters_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("damage", "culprit"),
    [
        (lambda d: shutil.rmtree(d), "model.json"),
        (lambda d: (d / "model.json").write_text("{not json"), "model.json"),
        (lambda d: (d / "model.json").write_text('{"name": "x"}'), "model.json"),
        (lambda d: (d / "tokenizer.json").write_text("[]"), "tokenizer.json"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
        (lambda d: (d / "model.onnx").write_bytes(b"\x08garbage"), "model.onnx"),
        (lambda d: (d / "model.onnx").unlink(), "model.onnx"),
        (lambda d: (d / "model.onnx.data").unlink(), "model.onnx"),
    ],
)
def test_broken_model_folders_fail_naming_the_file(
    tiny_model_dir: Path, tmp_path: Path, damage, culprit: str
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    with pytest.raises(ModelError, match=culprit):
        Engine.load(folder)


def test_card_from_another_graph_format_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    card = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**card, "graph": "something-else/9"}))
    with pytest.raises(ModelError, match="graph format"):
        Engine.load(folder)


def test_start_up_rate_measurement_is_positive(engine: Engine) -> None:
    assert measure_tokens_per_s(engine) > 0
    available = ort.get_available_providers()
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    assert engine.provider == wanted[0]  # CUDA when this onnxruntime offers it, else the CPU


# --- the real model --------------------------------------------------------------------------


@pytest.mark.slow
async def test_smollm2_knows_the_capital_of_france(smollm2_dir: Path) -> None:
    gen = Generator(Engine.load(smollm2_dir), max_batch=2)
    text, stats = await gen.submit(
        "What is the capital of France?", SamplingParams(max_tokens=32)
    ).result()
    await gen.close()
    assert "Paris" in text
    assert stats.finish_reason == "stop"
