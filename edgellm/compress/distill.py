"""Knowledge distillation: recover a pruned model's quality with the unpruned source model as teacher.

    loss = T^2 * KL(softmax(teacher / T) || softmax(student / T))                  (per token, mean)
         + hidden_weight * mean over chosen layers l and tokens t of
               ||h_student[l, t] - h_teacher[l, t]||^2 / ||h_teacher[l, t]||^2     (relative, per token)

The relative per-token hidden loss keeps the few tokens with huge residual norms (attention sinks) from
dominating. AdamW trains the student's float weights that remain after pruning (every layer's linears
and norms, the final norm); the embedding (tied to the lm_head) stays frozen, so the export keeps its
lossless Q8_0 gather. Training windows are drawn (seeded) from the start of the calibration corpus;
before/after losses are reported on held-out windows from its end (alice29.txt stays for evaluation).
Sized for a 2-core CPU: a few hundred steps of a few hundred tokens in minutes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from edgellm.compress.recipe import register_pass
from edgellm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillParams:
    """Short distillation from the unpruned source model (teacher) into the current model (student)."""

    steps: int = 60
    window: int = 256  # tokens per training sequence (one per step)
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 5
    temperature: float = 2.0
    hidden_weight: float = 1.0
    hidden_layers: tuple[int, ...] = ()  # () = 4 evenly spaced layers, the last included
    calibration: str = "asyoulik.txt"
    tokens: int = 16384  # training text: the first `tokens` tokens of the calibration file
    heldout_tokens: int = 1024  # evaluation: the file's last tokens (never trained on)
    max_seconds: float = 600.0  # a guard: training stops here (and says so) even if steps remain

    def __post_init__(self) -> None:
        for key in ("steps", "window", "tokens", "heldout_tokens"):
            value = getattr(self, key)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{key} must be a positive integer, found {value!r}")
        if self.window < 2 or self.tokens < self.window or self.heldout_tokens < self.window:
            raise ConfigError(f"need tokens >= window, heldout_tokens >= window and window >= 2; found "
                              f"tokens={self.tokens} heldout_tokens={self.heldout_tokens} window={self.window}")
        if not (self.lr > 0 and self.temperature > 0 and self.hidden_weight >= 0 and self.weight_decay >= 0):
            raise ConfigError("lr and temperature must be > 0; hidden_weight and weight_decay >= 0")
        if self.max_seconds <= 0 or self.warmup < 0:
            raise ConfigError("max_seconds must be > 0 and warmup >= 0")
        if any(type(i) is not int or i < 0 for i in self.hidden_layers):
            raise ConfigError(f"hidden_layers must be layer indices >= 0, found {list(self.hidden_layers)}")


def distill_windows(ids: list[int], p: DistillParams) -> tuple[list[list[int]], list[list[int]]]:
    """(training windows, held-out windows) from a tokenized calibration file: disjoint by construction."""
    if len(ids) < p.tokens + p.heldout_tokens:
        raise ConfigError(f"{p.calibration} has {len(ids)} tokens; distillation needs tokens + heldout_tokens = "
                          f"{p.tokens + p.heldout_tokens}")
    train = [ids[s:s + p.window] for s in range(0, p.tokens - p.window + 1, p.window)]
    tail = ids[len(ids) - p.heldout_tokens:]
    heldout = [tail[s:s + p.window] for s in range(0, len(tail) - p.window + 1, p.window)]
    return train, heldout


def default_layers(n_layers: int) -> tuple[int, ...]:
    return tuple(sorted({round(n_layers * f) - 1 for f in (0.25, 0.5, 0.75, 1.0)} - {-1}))


class Distiller:
    """Teacher and student LlamaModels, the trainable student tensors and the loss."""

    def __init__(self, teacher, student, p: DistillParams) -> None:
        import torch

        self.teacher, self.student, self.p = teacher, student, p
        n = student.config.n_layers
        self.layers = tuple(p.hidden_layers) or default_layers(n)
        bad = [layer for layer in self.layers if not 0 <= layer < n]
        if bad:
            raise ConfigError(f"hidden_layers {bad} out of range; the model has layers 0-{n - 1}")
        self.params = [student.output_norm] + [t for layer in student.layers for t in layer.values()]
        for t in self.params:
            t.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=p.lr, weight_decay=p.weight_decay)

    def loss(self, ids: list[int]) -> tuple:
        """(total, kl at temperature T, hidden loss) for one window; the total carries gradients."""
        import torch
        import torch.nn.functional as F

        tokens = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        with torch.no_grad():
            t_logits, t_hidden = self.teacher.trace(tokens, self.layers)
        s_logits, s_hidden = self.student.trace(tokens, self.layers)
        temp = self.p.temperature
        kl = F.kl_div(F.log_softmax(s_logits / temp, -1), F.log_softmax(t_logits / temp, -1), log_target=True,
                      reduction="batchmean") * temp ** 2
        hidden = torch.stack([((s_hidden[i] - t_hidden[i]).pow(2).sum(-1) / t_hidden[i].pow(2).sum(-1)).mean()
                              for i in self.layers]).mean()
        return kl + self.p.hidden_weight * hidden, kl, hidden

    def evaluate(self, windows: list[list[int]]) -> dict[str, float]:
        """Mean KL(teacher || student) at T = 1, and the hidden loss, over held-out windows."""
        import torch
        import torch.nn.functional as F

        kl = hidden = 0.0
        with torch.no_grad():
            for ids in windows:
                tokens = torch.as_tensor(np.asarray(ids, dtype=np.int64))
                t_logits, t_hidden = self.teacher.trace(tokens, self.layers)
                s_logits, s_hidden = self.student.trace(tokens, self.layers)
                kl += float(F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                                     reduction="batchmean"))
                hidden += float(np.mean([float(((s_hidden[i] - t_hidden[i]).pow(2).sum(-1)
                                                / t_hidden[i].pow(2).sum(-1)).mean()) for i in self.layers]))
        return {"kl": kl / len(windows), "hidden": hidden / len(windows)}

    def step(self, ids: list[int], step: int) -> float:
        p = self.p
        scale = (step + 1) / (p.warmup + 1) if step < p.warmup else \
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - p.warmup) / max(p.steps - p.warmup, 1)))
        for group in self.optimizer.param_groups:
            group["lr"] = p.lr * scale
        self.optimizer.zero_grad(set_to_none=True)
        total, _, _ = self.loss(ids)
        total.backward()
        self.optimizer.step()
        return float(total.detach())


@register_pass("distill", DistillParams)
def distill_pass(state, p: DistillParams) -> None:
    """Distil the unpruned source model into state.model in place; reports held-out KL before and after."""
    import torch

    from edgellm.model.llama import LlamaModel
    from edgellm.model.loader import load_model
    from edgellm.model.weights import WeightTensor

    model = state.model
    ids = _all_tokens(model, p.calibration)
    train, heldout = distill_windows(ids, p)
    teacher = LlamaModel(load_model(model.source))
    student = LlamaModel(model)
    torch.manual_seed(state.seed)
    distiller = Distiller(teacher, student, p)
    before = distiller.evaluate(heldout)
    order = np.random.default_rng(state.seed).permutation(np.resize(np.arange(len(train)), p.steps))
    steps = range(p.steps)
    bar = None
    if state.progress:
        from tqdm import tqdm

        steps = bar = tqdm(steps, desc="distill", unit="step")
    started, losses, done = time.monotonic(), [], 0
    for step in steps:
        if time.monotonic() - started > p.max_seconds:
            log.warning("distill stopped at step %d of %d: max_seconds=%s reached", step, p.steps, p.max_seconds)
            break
        losses.append(distiller.step(train[order[step]], step))
        done = step + 1
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    after = distiller.evaluate(heldout)
    for i, layer in enumerate(student.layers):
        for role, tensor in layer.items():
            _write_back(model, state, f"blk.{i}.{role}.weight", tensor, WeightTensor)
    _write_back(model, state, "output_norm.weight", student.output_norm, WeightTensor)
    state.report["distill"] = {
        "steps": done, "steps_asked": p.steps, "seconds": round(time.monotonic() - started, 1),
        "train_tokens": done * p.window, "hidden_layers": list(distiller.layers),
        "heldout_kl_before": before["kl"], "heldout_kl_after": after["kl"],
        "heldout_hidden_before": before["hidden"], "heldout_hidden_after": after["hidden"],
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last10_mean": float(np.mean(losses[-10:])) if losses else None,
    }
    log.info("distill: held-out KL %.4f -> %.4f", before["kl"], after["kl"])


def _write_back(model, state, name: str, tensor, weight_type) -> None:
    values = tensor.detach().numpy().astype(np.float32)
    model.weights.replace(name, weight_type.from_array(name, values))
    state.rewritten.add(name)


def _all_tokens(model, corpus: str) -> list[int]:
    from edgellm.corpus import canterbury_path
    from edgellm.model.tokenizer import Tokenizer

    return Tokenizer(model.tokenizer).encode(canterbury_path(corpus).read_bytes().decode("utf-8"))
