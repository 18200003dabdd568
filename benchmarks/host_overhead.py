"""Host time per engine step, by phase, on CPU with a tiny random model.

The model is so small (hidden 64, 2 layers) that what is left of a step is the engine's own
Python: the part that is host-bound on a GPU, where the forward is a ~2-3 ms CUDA graph replay.
The tokenizer is a real byte-level BPE (SmolLM2's, 49152 ids, from the model cache; a BPE trained
on this repo's sources otherwise), so incremental detokenization does real work.

    python benchmarks/host_overhead.py                       # batch 256 and batch 1, table at the end
    python benchmarks/host_overhead.py --profile 25          # + cProfile of batch-256 decode steps
    python benchmarks/host_overhead.py --stub-forward        # model replaced by a stub (see below)
    python benchmarks/host_overhead.py --final-only          # requests added with final_only=True

Workloads (like `autoglm bench throughput` / `bench latency`): all requests submitted at once
through `LLM.generate`, greedy, EOS ignored, fixed lengths. Only pure decode steps are counted.

--stub-forward replaces the model with a stub (8 logits per row; the real sampler runs on them and
its tokens are then swapped for random ids of the tokenizer's vocabulary): only the engine's host
code runs. Without it, host code right after a forward that streams tens of MB (KV gathers,
[256, 49152] logits) runs with cold CPU caches and costs several times more; a GPU step keeps
those bytes on the device, so the stub figures are the closer proxy for a GPU host.

Phases of a step (wall time, each wrapped around the engine's own calls):
    schedule     scheduler.schedule()
    prepare      scheduled batch -> host arrays -> model inputs (build_host_inputs + uploads)
    forward      the rest of runner.execute (model + logits)
    sample       sampler(logits, ...)  (not host time with the real model: an argmax over 49152
                 logits; with --stub-forward it is the sampler's own Python)
    postprocess  the rest of engine.step: .tolist(), computed counts, append token, stop checks,
                 detokenize, RequestOutputs
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from open_autoglm.llm import LLM  # noqa: E402
from open_autoglm.sampling_params import SamplingParams  # noqa: E402

# The clock of every phase: this thread's CPU time by default (--clock cpu). On a shared machine a
# wall clock also counts the time other processes hold the core; CPU time does not (torch runs the
# tiny model on this thread: --threads 1).
CLOCK = [time.thread_time]
PHASES = ("schedule", "prepare", "forward", "sample", "postprocess")
SMOLLM2 = Path.home() / ".cache" / "open-autoglm" / "models" / "smollm2-135m"


def tokenizer_files(target: Path, source: str | None) -> str:
    """Copy or train a byte-level BPE tokenizer into `target`; returns its description."""
    source_dir = Path(source) if source else SMOLLM2
    if (source_dir / "tokenizer.json").exists():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (source_dir / name).exists():
                (target / name).write_bytes((source_dir / name).read_bytes())
        return f"{source_dir} (byte-level BPE)"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.read_text() for p in sorted(Path(__file__).resolve().parents[1].glob("open_autoglm/**/*.py"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>").save_pretrained(target)
    return "byte-level BPE trained on the repo's sources (8192 ids)"


def tiny_model_folder(directory: Path, tokenizer: str | None) -> tuple[Path, str]:
    """config.json of a tiny Qwen2 (random weights, load_format='dummy') + a real tokenizer."""
    from transformers import AutoTokenizer

    described = tokenizer_files(directory, tokenizer)
    tok = AutoTokenizer.from_pretrained(directory)
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": len(tok), "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "hidden_act": "silu", "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id, "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory, described


class StubModel:
    """Stands in for the model under --stub-forward: no compute, 8 logits per sampled row."""

    def __call__(self, input_ids, positions, kv_caches, meta):
        return torch.zeros(input_ids.shape[0], 1)

    def compute_logits(self, hidden):
        return torch.randn(hidden.shape[0], 8)


class Phases:
    """Wraps the engine's calls with timers; one record per step, {phase: seconds}."""

    def __init__(self, engine, stub_forward: bool = False) -> None:
        self.stub_ids = None
        if stub_forward:
            vocab = engine.hf_config.vocab_size
            engine.runner.model = StubModel()
            self.stub_ids = (torch.Generator().manual_seed(1), min(1000, vocab // 2), vocab)
        self.steps: list[dict[str, float]] = []
        self.decode_steps: list[dict[str, float]] = []
        self.profiler: cProfile.Profile | None = None
        self.profile_decode = False
        self._current: dict[str, float] = defaultdict(float)
        self._is_decode = False
        self._wrap_engine(engine)

    def _timed(self, fn, phase: str):
        def timed(*args, **kwargs):
            t0 = CLOCK[0]()
            try:
                return fn(*args, **kwargs)
            finally:
                self._current[phase] += CLOCK[0]() - t0
        return timed

    def _wrap_engine(self, engine) -> None:
        import open_autoglm.worker.model_runner as model_runner

        schedule = engine.scheduler.schedule

        def timed_schedule():
            t0 = CLOCK[0]()
            batch = schedule()
            self._current["schedule"] += CLOCK[0]() - t0
            self._is_decode = bool(batch.scheduled) and all(n == 1 for _, n in batch.scheduled)
            return batch

        engine.scheduler.schedule = timed_schedule
        # prepare: whatever the runner calls to build inputs (module function + uploads)
        model_runner.build_host_inputs = self._timed(model_runner.build_host_inputs, "prepare")
        runner = engine.runner
        runner.uploader.step_tensors = self._timed(runner.uploader.step_tensors, "prepare")
        runner.execute = self._timed(runner.execute, "execute")
        sampler = engine.sampler
        timed_sample = self._timed(sampler.__call__, "sample")

        stub_ids = self.stub_ids

        class TimedSampler:
            def __call__(self, *args, **kwargs):
                out = timed_sample(*args, **kwargs)
                held.append(args[0])  # the logits: freed after the step's timer (see timed_step)
                if stub_ids is not None:  # the stub's 8 logits -> random ids of the real vocabulary
                    gen, low, high = stub_ids
                    out.token_ids = torch.randint(low, high, out.token_ids.shape, generator=gen)
                return out

            def __getattr__(self, name):
                return getattr(sampler, name)

        held: list = []
        engine.sampler = TimedSampler()
        step = engine.step

        def timed_step():
            if self.profiler is not None and self.profile_decode:
                self.profiler.enable()
            t0 = CLOCK[0]()
            outputs = step()
            total = CLOCK[0]() - t0
            # Freeing [256, 49152] float32 logits returns 50 MB to the OS (~ms of page unmapping) at
            # the end of step(); a GPU's caching allocator makes that free. Keep it out of the timers.
            held.clear()
            if self.profiler is not None:
                self.profiler.disable()
            self._finish_step(total)
            return outputs

        engine.step = timed_step

    def _finish_step(self, total: float) -> None:
        cur = self._current
        record = {
            "schedule": cur["schedule"], "prepare": cur["prepare"], "forward": cur["execute"] - cur["prepare"],
            "sample": cur["sample"],
        }
        record["postprocess"] = total - sum(record.values())
        record["total"] = total
        self.steps.append(record)
        if self._is_decode:
            self.decode_steps.append(record)
            self.profile_decode = True  # profile from the step after the first decode step on
        self._current = defaultdict(float)
        self._is_decode = False


def run(llm: LLM, batch: int, args) -> tuple[dict, str]:
    """`args.repeat` times the workload on one engine (fresh prompts: no prefix-cache hits);
    keeps the repeat with the lowest median step, the one least disturbed by other processes."""
    engine = llm.engine
    vocab = engine.hf_config.vocab_size
    phases = Phases(engine, args.stub_forward)
    if args.final_only:  # what LLM.generate gets by adding its requests with final_only=True
        engine.add_request = functools.partial(engine.add_request, final_only=True)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    best: dict | None = None
    profiler = None
    for rep in range(args.repeat):
        gen = torch.Generator().manual_seed(1000 * batch + rep)
        prompts = torch.randint(min(1000, vocab // 2), vocab, (batch, args.input_len), generator=gen).tolist()
        phases.decode_steps = []
        phases.profile_decode = False
        if args.profile and rep == 0:  # profiled run: slower, so never the one kept
            phases.profiler = profiler = cProfile.Profile()
        outputs = llm.generate(prompts, params)
        phases.profiler = None
        assert all(len(o.output_token_ids) == args.output_len for o in outputs)
        steps = phases.decode_steps[1:]  # the first decode step also pays for first-sight set-up
        # medians per phase: robust to the odd step another process slowed down
        summary = {p: 1e3 * statistics.median(s[p] for s in steps) for p in (*PHASES, "total")}
        # host = the engine's own CPU time; the real sampler's kernels (argmax over the vocabulary) are not
        summary["host"] = sum(summary[p] for p in PHASES) - summary["forward"]
        if not args.stub_forward:
            summary["host"] -= summary["sample"]
        summary["decode_steps"] = len(steps)
        summary["sample_text"] = outputs[0].text[:60]
        summary["profiled"] = profiler is not None and rep == 0
        if best is None or best["profiled"] or summary["total"] < best["total"]:
            best = summary
    report = ""
    if profiler is not None:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(args.profile)
        report = buf.getvalue()
    return best, report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default: 256 and 1)")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: SmolLM2's if pulled)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N functions (tottime)")
    p.add_argument("--stub-forward", action="store_true", help="replace the model by a stub: engine host code only")
    p.add_argument("--repeat", type=int, default=3, help="runs per batch size; the least disturbed one is kept")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="this thread's CPU time, or wall time")
    p.add_argument("--final-only", action="store_true",
                   help="add requests with final_only=True (one output per request, text decoded at the end)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the model is tiny; 1 is steadiest)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.thread_time if args.clock == "cpu" else time.perf_counter
    import open_autoglm.worker.model_runner as model_runner

    original_build = model_runner.build_host_inputs
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, described = tiny_model_folder(Path(tmp), args.tokenizer)
        for batch in args.batch or [256, 1]:
            model_runner.build_host_inputs = original_build
            llm = LLM(model=str(folder), device="cpu", load_format="dummy", max_num_seqs=max(batch, 1),
                      max_num_batched_tokens=8192, max_model_len=args.input_len + args.output_len + 16,
                      num_kv_blocks=batch * (-(-(args.input_len + args.output_len + 16) // 16)) + 64)
            llm.generate([[1000 + i for i in range(16)]] * 2, SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
            summary, report = run(llm, batch, args)
            results[batch] = summary
            if report:
                print(f"--- cProfile, batch {batch}, decode steps ---\n{report}")
            del llm
    mode = "stub forward" if args.stub_forward else "tiny random model (hidden 64, 2 layers)"
    mode += ", final_only requests" if args.final_only else ", a RequestOutput per token (as LLM.generate today)"
    print(f"{mode}; tokenizer: {described}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; {args.clock} clock; {args.input_len} in -> {args.output_len} out, greedy, ignore_eos")
    print(f"\n{'batch':>5} " + " ".join(f"{p:>12}" for p in (*PHASES, "host", "total"))
          + "   ms per decode step (median)")
    for batch, s in results.items():
        print(f"{batch:>5} " + " ".join(f"{s[p]:>12.3f}" for p in (*PHASES, "host", "total")))
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
