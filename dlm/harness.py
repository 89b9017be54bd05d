"""The lm-evaluation-harness model `dlm`: any dlm checkpoint (or AutoModelForMaskedLM folder) in the harness.

    python -m dlm.harness --model dlm --model_args pretrained=DIR,likelihood=mc,mc_samples=64 \
        --tasks TASKS [every lm_eval flag: --apply_chat_template, --batch_size, --limit, --log_samples, ...]

`python -m dlm.harness` is the harness's own command line with `dlm` registered (lm-eval 0.4 reads no
entry points for models, so plain `lm_eval --model dlm` cannot find it; `import dlm.harness` registers it
for `lm_eval.simple_evaluate(model="dlm", ...)`).

The three request types (DESIGN §4; every formula is dlm's own, nothing is re-derived here):
  * loglikelihood: log p(continuation | context), the context never masked, by
      - `likelihood=mc` (default): the stratified Monte-Carlo ELBO (`dlm.diffusion.likelihood_nll`, through
        `dlm.evaluation.elbo_rows`) with `mc_samples` draws in `mc_groups` independent groups, whose spread
        gives the standard error of each estimate (`last_loglikelihoods`); a lower bound on log p;
      - `likelihood=chain_rule`: exact, sum_i log p(x_i | c, x_<i, masks after), one pass per token
        (`dlm.diffusion.chain_rule_logprobs`).
    is_greedy: left-to-right greedy decoding of len(continuation) masks after the context writes exactly
    the continuation (each x_i is the argmax given c and x_<i): free with chain_rule, n passes with mc
    (`greedy=false` skips it and reports False). `append_eot`: the end-of-turn (chat) or EOS is scored as
    part of the continuation: `auto` (default) when the context ends with the assistant generation prompt.
  * loglikelihood_rolling: the same likelihood over the harness's disjoint windows of the model's length.
  * generate_until: `dlm.sampling.generate` with every sampler setting as a model arg, cut at the task's
    stop strings; forward passes (NFE) are counted per request (`last_generations`, `get_model_info`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dlm.errors import UsageError, run_main
from dlm.sampling import SamplerConfig, generate

logger = logging.getLogger(__name__)

# Model args that map one to one onto SamplerConfig fields (`steps` is --num_steps in inference.py).
SAMPLER_ARGS = ("gen_length", "steps", "block_length", "strategy", "threshold", "entropy_bound", "temperature",
                "top_k", "top_p", "cfg_scale")


def _flag(value, name: str) -> bool:
    """A boolean model arg: the harness passes true/false already parsed, Python callers pass bools."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise UsageError(f"model_args {name}={value!r}: expected true or false")


class DLMEvalModel(TemplateLM):
    """A masked diffusion LM behind the harness's three request types (see the module docstring)."""

    backend = "causal"  # how the harness splits context/continuation text; nothing causal is computed

    def __init__(self, pretrained="", tokenizer=None, hf_model_name: str | None = None, dtype: str = "auto",
                 device: str | None = None, batch_size: int | str | None = 32, max_batch_size: int | None = None,
                 max_length: int | None = None, trust_remote_code: bool = False, **settings):
        # max_batch_size (no "auto" probing) and trust_remote_code (no remote code is ever run) are accepted
        # because the harness passes them to every model.
        super().__init__()
        self._configure(batch_size=batch_size, **settings)
        self.model, self.tokenizer = self._load(pretrained, tokenizer, hf_model_name, dtype, device)
        self.model.eval()
        self._device = next(self.model.parameters()).device
        from dlm.modeling import unwrap

        positions = getattr(unwrap(self.model).config, "max_position_embeddings", None) or 512
        self.max_length = int(max_length or positions)
        from dlm.tokenization import special_ids

        try:
            ids = special_ids(self.tokenizer)
            self.eot_id, self.assistant_id = ids.eot, ids.assistant
        except UsageError:  # a tokenizer without chat markers: EOS ends a text, no turn ever ends
            self.eot_id = self.assistant_id = None
        self.passes = {"forward_calls": 0, "rows": 0}
        self._renderings: dict[str, list[int]] = {}  # apply_chat_template's texts -> ids
        self.model.register_forward_pre_hook(self._count_pass, with_kwargs=True)
        self.last_loglikelihoods: list[dict] = []
        self.last_generations: list[dict] = []
        self.totals: dict = defaultdict(float)

    def _configure(self, batch_size: int | str | None = 32, likelihood: str = "mc", mc_samples: int = 32,
                   mc_groups: int = 4, greedy=True, append_eot: str = "auto", chat=False, seed: int = 0, sparse=True,
                   early_stop=True, **sampler_args) -> None:
        """Check and keep every setting that needs no model (run alone by the CLI before the harness starts)."""
        unknown = sorted(set(sampler_args) - set(SAMPLER_ARGS))
        if unknown:
            raise UsageError(f"model_args: unknown argument(s) {', '.join(unknown)} for --model dlm")
        if likelihood not in ("mc", "chain_rule"):
            raise UsageError(f"model_args likelihood={likelihood!r}: expected mc or chain_rule")
        if not (isinstance(mc_samples, int) and isinstance(mc_groups, int) and mc_groups >= 1
                and mc_samples >= mc_groups and mc_samples % mc_groups == 0):
            raise UsageError(f"model_args mc_samples={mc_samples} must be a positive multiple of mc_groups={mc_groups}")
        if str(append_eot).lower() not in ("auto", "true", "false"):
            raise UsageError(f"model_args append_eot={append_eot!r}: expected auto, true or false")
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 32  # no memory probing: every request type batches rows of bounded length
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UsageError(f"--batch_size {batch_size!r}: expected a positive integer")
        self.batch_size, self.likelihood = int(batch_size), likelihood
        self.mc_samples, self.mc_groups, self.seed = mc_samples, mc_groups, int(seed)
        self.greedy, self.chat, self.sparse = _flag(greedy, "greedy"), _flag(chat, "chat"), _flag(sparse, "sparse")
        self.append_eot = str(append_eot).lower()
        try:
            self.sampler = SamplerConfig(**{"gen_length": 256, **sampler_args},
                                         stop_at_eos=_flag(early_stop, "early_stop")).validate()
        except (UsageError, TypeError) as err:
            raise UsageError(f"model_args: {err}") from None
        self.gen_length_set = "gen_length" in sampler_args

    @classmethod
    def check_model_args(cls, model_args: dict) -> None:
        """Refuse bad model args in one line before the harness indexes its tasks or a model is loaded."""
        args = dict(model_args)
        pretrained = args.pop("pretrained", "")
        if not pretrained:
            raise UsageError("model_args pretrained=DIR is required (a dlm checkpoint or AutoModelForMaskedLM folder)")
        if isinstance(pretrained, (str, Path)) and not Path(pretrained).exists():
            raise UsageError(f"model_args pretrained {pretrained}: no such checkpoint folder or .safetensors file")
        for name in ("tokenizer", "hf_model_name", "dtype", "device", "max_batch_size", "max_length",
                     "trust_remote_code"):
            args.pop(name, None)
        cls.__new__(cls)._configure(**args)

    # ------------------------------------------------------------------ loading and text

    @staticmethod
    def _load(pretrained, tokenizer, hf_model_name, dtype, device):
        """A checkpoint folder (or bare .safetensors + hf_model_name), or an already loaded model and tokenizer."""
        dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if str(dtype) not in dtypes:
            raise UsageError(f"model_args dtype={dtype!r}: expected one of {', '.join(dtypes)}")
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif str(device).startswith("cuda") and not torch.cuda.is_available():
            # The harness's --device defaults to cuda: on a machine without one, run where we can.
            logger.warning("--device %s: no CUDA device is available, using the CPU", device)
            device = "cpu"
        if isinstance(pretrained, torch.nn.Module):
            if tokenizer is None:
                raise UsageError("model_args: a loaded model needs its tokenizer (tokenizer=...)")
            from dlm.tokenization import load_tokenizer, prepare_tokenizer

            tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else prepare_tokenizer(tokenizer)
            return pretrained.to(device), tok
        if not pretrained:
            raise UsageError("model_args pretrained=DIR is required (a dlm checkpoint or AutoModelForMaskedLM folder)")
        from dlm.modeling import load_checkpoint

        model, tok = load_checkpoint(str(pretrained), hf_model_name, dtype=dtypes[str(dtype)],
                                     flag="model_args pretrained")
        return model.to(device), tok

    def _count_pass(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.passes["forward_calls"] += 1
        self.passes["rows"] += int(ids.shape[0]) if ids is not None else 0

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # An empty context is the start of a text: the BOS every training row begins with.
        return self.tokenizer.bos_token_id

    @property
    def max_gen_toks(self) -> int:
        return self.sampler.gen_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The checkpoint's own chat template (--apply_chat_template, --system_instruction, --fewshot_as_multiturn).

        The harness gets text back and hands it to `tok_encode` later: the rendering is remembered with its
        ids, so that only the template's markers become marker ids and the messages stay text."""
        from dlm.tokenization import encode_chat, render_chat

        text = render_chat(self.tokenizer, chat_history, add_generation_prompt=add_generation_prompt)
        self._renderings[text] = encode_chat(self.tokenizer, chat_history, add_generation_prompt)
        return text

    def _rendered_prefix(self, string: str) -> tuple[int, list[int]] | None:
        """(length, ids) of the longest chat rendered by `apply_chat_template` that `string` starts with.

        A rendering ends with a marker (or is the bare BOS), so only the prefixes ending at one are looked up."""
        if not self._renderings:
            return None
        from dlm.tokenization import CHAT_TOKENS

        markers = [*CHAT_TOKENS, *([self.tokenizer.bos_token] if self.tokenizer.bos_token else [])]
        ends = {m.end() for m in re.finditer("|".join(re.escape(t) for t in markers), string)}
        for end in sorted(ends, reverse=True):
            if string[:end] in self._renderings:
                return end, self._renderings[string[:end]]
        return None

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Ids of a text; a context starts with BOS, as every training row does (a rendered chat already has it).

        Text is text: a special token's string in it is ordinary tokens; only a chat this model rendered
        (`apply_chat_template`) brings its markers, and `[MASK*n]` is not the infill syntax here."""
        from dlm.tokenization import encode_text

        rendered = self._rendered_prefix(string)
        if rendered is not None:
            end, ids = rendered
            return ids + encode_text(self.tokenizer, string[end:])
        ids = encode_text(self.tokenizer, string)
        bos = self.tokenizer.bos_token_id
        if add_special_tokens is not False and bos is not None:
            ids = [bos] + ids
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _rendered(self, context: str) -> bool:
        return self._rendered_prefix(context) is not None

    def _user_turn(self, context: str) -> list[int]:
        """A plain context as one user turn with the generation prompt (model_args chat=true)."""
        from dlm.tokenization import encode_chat

        return encode_chat(self.tokenizer, [{"role": "user", "content": context}], add_generation_prompt=True)

    def encode_context(self, context: str) -> list[int]:
        """Prompt ids: verbatim when the harness rendered the chat template, one user turn with chat=true."""
        if self.chat and not self._rendered(context):
            return self._user_turn(context)
        return self.tok_encode(context)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if self.chat and not self._rendered(context):
            # The generation prompt ends with <|assistant|>: the answer tokenizes on its own (DESIGN's prefix rule).
            return self._user_turn(context), self.tok_encode(continuation, False)
        return super()._encode_pair(context, continuation)

    # ------------------------------------------------------------------ loglikelihood

    def _stop_token(self, context: list[int]) -> int | None:
        """The token appended to a continuation (append_eot), or None."""
        ends_turn = self.assistant_id is not None and bool(context) and context[-1] == self.assistant_id
        if self.append_eot == "false" or (self.append_eot == "auto" and not ends_turn):
            return None
        return self.eot_id if ends_turn and self.eot_id is not None else self.tokenizer.eos_token_id

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """Drop context from the left so that the canvas fits the model (as the harness's causal models do)."""
        if len(continuation) >= self.max_length:
            raise UsageError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                             f"{self.max_length} positions (model_args max_length)")
        return context[max(0, len(context) + len(continuation) - self.max_length):]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              cache: bool = True) -> list[tuple[float, bool]]:
        scored = []
        for _, context, continuation in requests:
            stop = self._stop_token(context)
            continuation = list(continuation) + ([stop] if stop is not None else [])
            scored.append((self._fit(list(context), continuation), continuation))
        details = self.score(scored)
        out = [(d["logprob"], d["is_greedy"]) for d in details]
        if cache:
            for (strings, _, _), res in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood", strings, res)
        return out

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[dict]:
        """log p(continuation | context) of id pairs with this model's settings: logprob, stderr, is_greedy, tokens.

        Kept as `last_loglikelihoods` after each call (the harness itself only takes (logprob, is_greedy)).

        Identical pairs are scored once; requests are sorted by length so that a batch holds rows of
        similar length (the choices of one question land together).
        """
        from dlm.diffusion import chain_rule_logprobs

        start, calls = time.perf_counter(), dict(self.passes)
        # An empty continuation (the harness's empty-context split can leave one) has probability one.
        result: dict[tuple, dict] = {(tuple(c), ()): {"logprob": 0.0, "stderr": 0.0, "is_greedy": True}
                                     for c, x in pairs if not x}
        unique = list(dict.fromkeys((tuple(c), tuple(x)) for c, x in pairs if x))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        mask = self.tokenizer.mask_token_id
        if unique and (self.likelihood == "chain_rule" or self.greedy):
            exact = chain_rule_logprobs(self.model, [c for c, _ in unique], [x for _, x in unique], mask, pad,
                                        self.batch_size, self.sparse)
            for key, (lp, greedy) in zip(unique, exact):
                result[key] = {"logprob": float(lp.sum()), "stderr": 0.0, "is_greedy": greedy}
        if unique and self.likelihood == "mc":
            for key, (nll, var) in zip(unique, self._mc_nll(unique)):
                greedy = result[key]["is_greedy"] if key in result else False
                result[key] = {"logprob": -nll, "stderr": math.sqrt(var) if var == var else float("nan"),
                               "is_greedy": greedy}
        self.totals["loglikelihood_requests"] += len(pairs)
        self.totals["loglikelihood_seconds"] += time.perf_counter() - start
        self.totals["loglikelihood_forward_calls"] += self.passes["forward_calls"] - calls["forward_calls"]
        out = []
        for c, x in pairs:
            out.append({**result[(tuple(c), tuple(x))], "tokens": len(x), "method": self.likelihood})
        self.last_loglikelihoods = out
        if self.likelihood == "mc":  # the results' config then shows how precise the estimates were
            self.totals["mc_stderr_sum"] += sum(d["stderr"] for d in out if d["stderr"] == d["stderr"])
            self.totals["mc_requests"] += len(out)
        return out

    def _mc_nll(self, pairs: list[tuple[tuple, tuple]]) -> list[tuple[float, float]]:
        """Monte-Carlo ELBO NLL and its Monte-Carlo variance per (context, continuation), batched by length."""
        from dlm.evaluation import elbo_rows

        order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][0]) + len(pairs[k][1]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        def batches():
            for s in range(0, len(order), self.batch_size):
                rows = [pairs[k] for k in order[s:s + self.batch_size]]
                width = max(len(c) + len(x) for c, x in rows)
                batch = {name: torch.zeros((len(rows), width), dtype=torch.long)
                         for name in ("input_ids", "answer_mask", "attention_mask")}
                batch["input_ids"].fill_(pad)
                for b, (c, x) in enumerate(rows):
                    batch["input_ids"][b, :len(c) + len(x)] = torch.tensor(list(c) + list(x))
                    batch["answer_mask"][b, len(c):len(c) + len(x)] = 1  # the context is never masked
                    batch["attention_mask"][b, :len(c) + len(x)] = 1
                yield batch

        # Row k of the sorted order draws from row_generator(seed, k): fixed per request set, whatever the batch size.
        nlls, _, variances = elbo_rows(self.model, batches(), self.tokenizer.mask_token_id, self.mc_samples, self.seed,
                                       self.mc_groups, self.sparse)
        out: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
        for k, nll, var in zip(order, nlls, variances):
            out[k] = (nll, var)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of the likelihood over disjoint windows that fill the model's positions (context never masked)."""
        windows, owner = [], []
        for r, req in enumerate(requests):
            ids = self.tok_encode(req.args[0], add_special_tokens=False)
            # A window is context + continuation: max_length - 1 tokens of prediction span plus the prefix token.
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    ids, self.prefix_token_id, self.max_length - 1, 1)):
                windows.append((list(ctx), list(cont)))
                owner.append(r)
        details = self.score(windows)
        totals = [0.0] * len(requests)
        for r, d in zip(owner, details):
            totals[r] += d["logprob"]
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def _sampler_for(self, gen_kwargs: dict) -> SamplerConfig:
        cfg = self.sampler
        length = cfg.gen_length if self.gen_length_set else int(gen_kwargs.get("max_gen_toks", cfg.gen_length))
        temperature = cfg.temperature
        if gen_kwargs.get("do_sample") and gen_kwargs.get("temperature") is not None:
            temperature = float(gen_kwargs["temperature"])  # the task asks for sampling at its temperature
        try:
            return dataclasses.replace(cfg, gen_length=length, temperature=temperature).validate()
        except UsageError as err:
            raise UsageError(f"model_args: {err} (generation length {length})") from None

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """dlm's sampler on each context, batched by generation settings and context length, cut at `until`."""
        groups: dict[str, list[int]] = defaultdict(list)
        for r, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(r)
        texts: list[str] = [""] * len(requests)
        records: list[dict] = [{}] * len(requests)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            config = self._sampler_for(gen_kwargs)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            room = self.max_length - config.gen_length
            if room < 1:
                raise UsageError(f"model_args gen_length={config.gen_length} leaves no room for a prompt in the "
                                 f"model's {self.max_length} positions")
            prompts = {r: self.encode_context(requests[r].args[0])[-room:] for r in indices}
            indices = sorted(indices, key=lambda r: len(prompts[r]))
            start = time.perf_counter()
            results = generate(self.model, self.tokenizer, [prompts[r] for r in indices], config,
                               seed=self.seed, batch_size=self.batch_size)
            seconds = time.perf_counter() - start
            for r, res in zip(indices, results):
                text = res.text
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                texts[r] = text
                records[r] = {"nfe": res.nfe, "generated_tokens": res.num_generated, "text": text}
                self.cache_hook.add_partial("generate_until", requests[r].args, text)
            self.totals["generate_requests"] += len(indices)
            self.totals["generate_nfe"] += sum(res.nfe for res in results)
            self.totals["generate_seconds"] += seconds
        self.last_generations = records
        if requests:
            logger.info("generate_until: %d requests, %.2f forward passes (NFE) per request",
                        len(requests), sum(r["nfe"] for r in records) / len(requests))
        return texts

    def get_model_info(self) -> dict:
        """Recorded in the harness's results["config"]: how likelihoods and generations were computed."""
        info = {"dlm_likelihood": self.likelihood, "dlm_append_eot": self.append_eot, "dlm_chat": self.chat,
                "dlm_sampler": dataclasses.asdict(self.sampler), "dlm_max_length": self.max_length}
        if self.likelihood == "mc":
            info.update(dlm_mc_samples=self.mc_samples, dlm_mc_groups=self.mc_groups, dlm_seed=self.seed)
        info.update({f"dlm_{k}": v for k, v in self.totals.items() if k != "mc_stderr_sum"})
        if self.totals.get("mc_stderr_sum"):
            info["dlm_mc_mean_stderr"] = self.totals["mc_stderr_sum"] / self.totals["mc_requests"]
        if self.totals.get("generate_requests"):
            info["dlm_nfe_per_request"] = self.totals["generate_nfe"] / self.totals["generate_requests"]
        return info


def register() -> None:
    """Register `dlm` with the harness (by import path, so that `python -m dlm.harness` registers one class)."""
    import lm_eval.models  # noqa: F401  (the harness's own models first: a non-empty registry skips their import)

    if "dlm" not in model_registry:
        model_registry.register("dlm", target="dlm.harness:DLMEvalModel")


register()


def main() -> int:
    """The harness's command line (`lm_eval run ...` and its legacy form) with `dlm` registered."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    cli = HarnessCLI()
    args = cli.parse_args()
    if getattr(args, "model", None) == "dlm" and isinstance(getattr(args, "model_args", None), dict):
        DLMEvalModel.check_model_args(args.model_args)
    cli.execute(args)
    return 0


if __name__ == "__main__":
    run_main(main)
