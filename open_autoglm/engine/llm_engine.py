"""The engine: requests in, one `step()` at a time, RequestOutputs out.

    step():  scheduler.schedule() -> runner.execute() -> sampler() -> .tolist() -> finish checks

On CUDA a decode phase runs overlapped (engine/lookahead.py): each step() launches the next step
before it reads the tokens of the one in flight, and returns that one's outputs.

Everything that changes engine state (adding, aborting, updating weights) happens between steps
on the thread that calls `step()`.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from open_autoglm.attention import get_attention_backend
from open_autoglm.config import EngineConfig
from open_autoglm.engine.block_manager import BlockManager
from open_autoglm.engine.detokenizer import FastDecoder, IncrementalDetokenizer
from open_autoglm.engine.lookahead import InFlight, continuation, launchable
from open_autoglm.engine.request import Request, RequestOutput, RequestStatus
from open_autoglm.engine.scheduler import Scheduler, SchedulerOutput
from open_autoglm.engine.updates import UpdateManager, UpdateReport, UpdateSource  # [updates hook]
from open_autoglm.errors import RequestError
from open_autoglm.models.loader import build_model, open_source, resolve_dtype
from open_autoglm.sample import Sampler
from open_autoglm.sampling_params import SamplingParams
from open_autoglm.worker.model_runner import ModelRunner
from open_autoglm.worker.updates import allocate_model  # [updates hook]
from open_autoglm.worker.version import folder_version

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RequestError("device", "device 'cuda' asked for, but no CUDA GPU is available; use 'cpu' or 'auto'")
    return torch.device(name)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **options) -> None:
        from open_autoglm.models.catalog import resolve_model

        self.config = config or EngineConfig.from_options(**options)
        cfg = self.config
        t0 = time.perf_counter()
        self.device = resolve_device(cfg.device)
        self.model_path = resolve_model(cfg.model, cfg.model_cache_dir)
        source = open_source(self.model_path)
        self.hf_config = source.hf_config
        self.tokenizer = source.tokenizer
        self._decoder = FastDecoder(self.tokenizer)  # see decoder()
        self.eos_token_ids = source.eos_token_ids
        self.dtype = resolve_dtype(cfg.dtype, self.device, self.hf_config)
        self.attention = get_attention_backend(cfg.attention_backend, self.device)
        self.model = self._build_model(source)
        self.load_seconds = time.perf_counter() - t0
        context_len = self.hf_config.max_position_embeddings
        self.max_model_len = min(cfg.max_model_len or context_len, context_len)
        self.runner = ModelRunner(self.model, self.hf_config, self.device, self.dtype, cfg.block_size)
        num_blocks = self._init_kv_cache_and_graphs()
        self.version = folder_version(self.model_path)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.sampler = Sampler(seed=cfg.seed)
        self.overlap = cfg.async_scheduling == "on" or (cfg.async_scheduling == "auto" and self.device.type == "cuda")
        self._inflight: InFlight | None = None  # a launched step whose tokens are not read yet
        self._settled: list[RequestOutput] = []  # outputs of a step finished by settle(), for the next step()
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.updates = UpdateManager(self)  # [updates hook] live weight updates (engine/updates.py)
        self.updates.on_start(source)
        logger.info(
            "engine ready: %s (%s, %s) on %s in %.1fs; KV cache %d blocks = %d tokens, max concurrency %.1f at %d tokens",
            self.model_path, type(self.model).__name__, self.dtype, self.device, self.load_seconds, num_blocks,
            num_blocks * cfg.block_size, num_blocks * cfg.block_size / self.max_model_len, self.max_model_len,
        )

    def _build_model(self, source):
        cfg = self.config
        if cfg.load_strategy == "lazy" and cfg.load_format != "dummy":  # [updates hook] weights read on 1st request
            return allocate_model(source, self.dtype, self.device, self.attention)
        return build_model(source, self.dtype, self.device, self.attention, random_weights=cfg.load_format == "dummy")

    def _init_kv_cache_and_graphs(self) -> int:
        """Size the KV cache after a warm-up forward (GPU: the real activation peak; CPU: a short
        one, the byte budget decides), then capture decode CUDA graphs. Returns the block count."""
        cfg = self.config
        warmup = min(cfg.max_num_batched_tokens, self.max_model_len)
        num_blocks = self.runner.init_kv_cache(cfg.num_kv_blocks, cfg.gpu_memory_utilization, cfg.kv_cache_bytes,
                                               warmup if self.device.type == "cuda" else min(warmup, 64))
        if num_blocks == 0:
            raise RequestError("gpu_memory_utilization",
                               "no memory left for the KV cache; raise it or lower max_num_batched_tokens")
        self.graph_capture_seconds = 0.0
        if self.device.type == "cuda" and cfg.cuda_graphs and self.attention.name == "triton":
            self.graph_capture_seconds = self.runner.capture_cuda_graphs(min(cfg.max_num_seqs, 512), self.max_model_len)
        return num_blocks

    # -- requests -------------------------------------------------------------------------------
    def decoder(self) -> FastDecoder:
        """What new detokenizers decode with; follows self.tokenizer (a weights switch may replace it)."""
        if self._decoder.tokenizer is not self.tokenizer:
            self._decoder = FastDecoder(self.tokenizer)
        return self._decoder

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def add_request(self, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    request_id: str | None = None, final_only: bool = False) -> str:
        """Queue a request. final_only: the caller reads only its final output (offline batches);
        no per-step RequestOutput is built for it and, without stop strings, its text is decoded
        once at the end."""
        params = params or SamplingParams()
        prompt_ids = self._prompt_ids(prompt)
        self._check_fits(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError("request_id", f"{request_id!r} is already in use")
        request = Request(request_id, prompt_ids, params, eos_token_ids=self.eos_token_ids,
                          prompt=prompt if isinstance(prompt, str) else None, version=self.version,
                          final_only=final_only)
        request.max_num_tokens = min(request.max_num_tokens, self.max_model_len)
        self.requests[request_id] = request
        self.num_prompt_tokens_total += len(prompt_ids)
        self.detokenizers[request_id] = IncrementalDetokenizer(self.decoder(), prompt_ids, params, final_only)
        self.scheduler.add(request)
        return request_id

    def _prompt_ids(self, prompt: str | list[int] | None) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt", "prompt is empty")
            return self.tokenize(prompt)
        if not prompt:
            raise RequestError("prompt", "prompt is empty")
        vocab = self.hf_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise RequestError("prompt", f"token ids must be integers in [0, {vocab})")
        return list(prompt)

    def _check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError("prompt", f"prompt has {len(prompt_ids)} tokens; max_model_len is "
                                         f"{self.max_model_len}, which leaves no room to generate")
        total = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        needed = self.block_manager.blocks_needed(total)
        if needed > self.block_manager.num_blocks:
            raise RequestError("max_tokens", f"prompt + max_tokens = {total} tokens needs {needed} KV blocks, but the "
                                             f"cache holds {self.block_manager.num_blocks}; lower max_tokens")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        return self._finish_output(request, [], "", [])

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished() or self._inflight is not None or bool(self._settled)
                or self.updates.has_work())  # [updates hook]

    # -- live weight updates [updates hook]: thin delegations to engine/updates.py ----------------
    def update_weights(self, source: UpdateSource | str | None = None, policy: str = "drain",
                       **options) -> UpdateReport:
        """Hot swap (mode="full", default) or delta update (mode="delta") to `source`: a model folder,
        a delta file, or UpdateSource(model=, version=) from the registry. See docs/updates.md."""
        if not isinstance(source, UpdateSource):
            source = UpdateSource(path=str(source) if source is not None else None)
        return self.updates.update(source, policy, **options)

    def rollback(self, policy: str = "drain", **options) -> UpdateReport:
        """Back to the version before the last update (the overwritten tensors are kept on host)."""
        return self.updates.rollback(policy, **options)

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        settled, self._settled = self._settled, []
        if self._inflight is not None:
            return settled + self._step_overlapped()
        outputs = settled + self.updates.before_step()  # [updates hook] weight switches happen here, between steps
        batch = self.scheduler.schedule()
        if batch.is_empty():
            return outputs
        try:
            logits, sampling = self.runner.execute(batch)
            sampled = self.sampler(logits, sampling)
            if self.overlap and launchable(batch, sampling, sampled.logprobs is not None):
                self._inflight = InFlight.launch(batch, sampling, sampled.token_ids)
                return outputs  # its tokens are read by the next step(), after it launches the step after
            token_ids = sampled.token_ids.tolist()  # the one host sync per step
            logprobs = sampled.logprobs_list() if sampled.logprobs is not None else [None] * len(sampling)
        except Exception as e:  # a failed forward ends the requests it carried, not the engine
            logger.exception("engine step failed")
            return outputs + self._fail(batch, f"{type(e).__name__}: {e}")
        self.scheduler.update(batch)
        return outputs + self._append_tokens(sampling, token_ids, logprobs)

    def _step_overlapped(self) -> list[RequestOutput]:
        """Launch the continuation of the step in flight (if it is one), then finish the step in
        flight: wait for its tokens only, append them, return its outputs (engine/lookahead.py)."""
        prev, self._inflight = self._inflight, None
        try:
            nxt = None if self.updates.has_work() else continuation(self.scheduler, prev)  # [updates hook]
            if nxt is not None:
                logits, sampling = self.runner.execute(nxt, input_ids=prev.token_ids)
                self._inflight = InFlight.launch(nxt, sampling, self.sampler(logits, sampling).token_ids)
        except Exception as e:  # as in step(): the requests carried end, the engine goes on
            logger.exception("engine step failed")
            self._inflight = None
            return self._fail(prev.live_batch(), f"{type(e).__name__}: {e}")
        return self._finish_inflight(prev)

    def settle(self) -> None:
        """Finish the step in flight now; its outputs come with the next step(). For changes that
        must find every launched step processed (a weight switch preempts or aborts requests)."""
        if self._inflight is not None:
            prev, self._inflight = self._inflight, None
            self._settled += self._finish_inflight(prev)

    def _finish_inflight(self, prev: InFlight) -> list[RequestOutput]:
        """Read a launched step's tokens (waiting for it alone) and append them. Rows whose request
        ended, was aborted or was preempted since the launch are dropped."""
        try:
            token_ids = prev.tokens()
        except Exception as e:
            logger.exception("engine step failed")
            return self._fail(prev.live_batch(), f"{type(e).__name__}: {e}")
        if not prev.updated:
            self.scheduler.update(prev.live_batch())
        rows = [(r, t) for r, t in zip(prev.requests, token_ids) if r.status is RequestStatus.RUNNING]
        return self._append_tokens([r for r, _ in rows], [t for _, t in rows], [None] * len(rows))

    def _append_tokens(self, requests: list[Request], token_ids: list[int],
                       logprobs: list[dict | None]) -> list[RequestOutput]:
        """Append each row's token, check stops, detokenize; outputs in row order.

        Runs for every row of every step, so it is one loop with the per-row work inlined: a stop
        check is a set lookup (stop_ids) and a compare (max_num_tokens); only a row that may end
        goes through _stop_status, and final_only rows build no output until they end."""
        now = time.monotonic()
        self.num_generation_tokens_total += len(token_ids)
        detokenizers = self.detokenizers
        outputs: list[RequestOutput | None] = []
        ends: list[tuple[int, Request, int, str, list]] = []  # (index in outputs, request, token, text, lp)
        for request, token_id, lp in zip(requests, token_ids, logprobs):
            if request.first_token_time is None:
                request.first_token_time = now
            output_ids = request.output_token_ids
            output_ids.append(token_id)
            if lp is not None:
                request.output_logprobs.append(lp)
            detok = detokenizers[request.request_id]
            new_text, stop_str = detok.append(token_id)
            if (stop_str is None and token_id not in request.stop_ids
                    and len(request.prompt_token_ids) + len(output_ids) < request.max_num_tokens):
                if not request.final_only:
                    outputs.append(RequestOutput.of(request, [token_id], new_text, detok.output_text,
                                                    [lp] if lp is not None else []))
                continue
            request.status = self._stop_status(request, token_id, stop_str)
            ends.append((len(outputs), request, token_id, new_text, [lp] if lp is not None else []))
            outputs.append(None)
        if ends:  # blocks freed in row order (the free queue's LRU order), one pass over `running`
            self.scheduler.finish_many([request for _, request, _, _, _ in ends])
            for i, request, token_id, new_text, lp in ends:
                outputs[i] = self._finish_output(request, [token_id], new_text, lp)
        return outputs  # type: ignore[return-value]  # every None was replaced

    @staticmethod
    def _stop_status(request: Request, token_id: int, stop_str: str | None) -> RequestStatus:
        """Why a row that may end does end (and its stop_reason), checks in order of precedence."""
        params = request.sampling_params
        if stop_str is not None:
            request.stop_reason = stop_str
            return RequestStatus.FINISHED_STOPPED
        if token_id in request.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        return RequestStatus.FINISHED_LENGTH  # num_tokens reached max_num_tokens

    def _fail(self, batch: SchedulerOutput, error: str) -> list[RequestOutput]:
        outputs = []
        for request, _ in batch.scheduled:
            request.error = error
            self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
            outputs.append(self._finish_output(request, [], "", []))
        return outputs

    def _finish_output(self, request: Request, new_ids: list[int], new_text: str, lp: list) -> RequestOutput:
        """The last output of a request that has ended (its status says why)."""
        detok = self.detokenizers.pop(request.request_id)
        if request.status != RequestStatus.FINISHED_STOPPED or not isinstance(request.stop_reason, str):
            new_text += detok.finish()  # text held back for a stop string or a split character
        self.requests.pop(request.request_id, None)
        self.sampler.forget(request.request_id)
        if request.final_only:  # its only output: the deltas are everything
            new_ids, new_text, lp = list(request.output_token_ids), detok.output_text, list(request.output_logprobs)
        return RequestOutput.of(request, new_ids, new_text, detok.output_text, lp)

    # -- stats ----------------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage, "num_free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks,
            "prefix_cache_queries": bm.num_queries, "prefix_cache_hits": bm.num_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens": self.num_prompt_tokens_total, "generation_tokens": self.num_generation_tokens_total,
        }
