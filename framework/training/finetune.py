"""Fine-tuning a pretrained denoiser: LoRA adapters through ``peft``, or full fine-tuning with chosen parts frozen.

``VideoDiffusion(finetuning=...)`` takes one of these (YAML ``model.init_args.finetuning``, docs/pretrained.md)::

    finetuning:
      class_path: framework.training.finetune.LoRA
      init_args: {rank: 16, alpha: 16, target_modules: [to_q, to_k, to_v, to_out.0]}

The base weights come from the denoiser plugin itself (a diffusers folder it loads) or from ``base_weights``, a
Kinetoscope checkpoint (``.ckpt`` or its ``.safetensors`` export) of a model of the same configuration.

What the checkpoints hold: only what is trained (the trainable parameters, their EMA copies, the optimizer state of
those) and a fingerprint of the frozen weights and buffers. Loading one (resume with ``--ckpt_path``,
``predict``, ``load_from_checkpoint``) fills the frozen weights from the freshly built model and refuses a model
whose frozen weights differ from those the checkpoint was trained against, so a resume is exact or fails loudly.

LoRA (Hu et al. 2021): each targeted linear layer ``y = W x`` becomes ``y = W x + (alpha / rank) B A x`` with ``A``
[rank, in] random and ``B`` [out, rank] zero, so training starts from the base model exactly. Only ``A`` and ``B``
train. For sampling the update is merged into ``W`` (one matmul per layer instead of three); merged and unmerged
give the same output up to float rounding. ``save_diffusers_lora`` writes the adapters in the key format of
diffusers' ``load_lora_weights`` (``transformer.<module path>.lora_A.weight``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from framework.training.atomic_files import write_verified

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"  # peft's adapter name; one adapter per model
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(folder) looks for
FINGERPRINT_KEY = "frozen_weights_fingerprint"
_FINGERPRINT_ELEMENTS = 4096  # elements hashed from each end of each frozen tensor


class FineTuning(ABC):
    """How a pretrained model is trained: which weights train, and where the frozen base comes from.

    ``apply`` runs once in ``VideoDiffusion.__init__`` on its trained modules (``denoiser``, ``conditioner`` and,
    with frame conditioning, ``frame_embedding``), before the optimizer and the EMA copy are made."""

    def __init__(self, base_weights: str | None = None) -> None:
        """``base_weights``: a Kinetoscope checkpoint (``.ckpt``) or its ``.safetensors`` export whose
        ``denoiser.*`` / ``conditioner.*`` (/ ``frame_embedding.*``) weights replace the freshly built ones; None
        when the plugins load their pretrained weights themselves (a diffusers folder)."""
        self.base_weights = base_weights

    def apply(self, modules: nn.ModuleDict) -> None:
        if self.base_weights is not None:
            load_base_weights(modules, self.base_weights)
        self.select_trainable(modules)
        if not any(p.requires_grad for p in modules.parameters()):
            raise ValueError(f"{type(self).__name__}: no parameter is left to train")

    @abstractmethod
    def select_trainable(self, modules: nn.ModuleDict) -> None:
        """Set ``requires_grad`` (adding adapter modules where the method has them)."""

    def merge(self, denoiser: nn.Module) -> None:
        """Fold trained adapters into the base weights for sampling (no-op without adapters)."""

    def unmerge(self, denoiser: nn.Module) -> None:
        """Undo ``merge``."""

    def export(self, denoiser: nn.Module, folder: Path) -> Path | None:
        """Write the trained weights in a form other tools read; returns the file, or None when there is none."""
        return None


class LoRA(FineTuning):
    """Low-rank adapters (``peft``) on the denoiser's linear layers; everything else is frozen."""

    def __init__(self, target_modules: list[str], rank: int = 16, alpha: float | None = None, dropout: float = 0.0,
                 merge_for_sampling: bool = True, base_weights: str | None = None) -> None:
        """``target_modules``: names of linear layers, each matching every module whose path inside the denoiser
        equals it or ends with ``.<name>`` (``qkv`` matches ``blocks.0.attn.qkv``; ``attn1.to_q`` only the
        self-attention queries of a Wan block); each must match at least one ``nn.Linear``. ``alpha`` scales the
        update by ``alpha / rank`` (default: ``rank``, a scale of 1). ``dropout`` drops adapter inputs in training.
        ``merge_for_sampling`` folds the adapters into the weights for ``predict``. ``base_weights``: a Kinetoscope
        checkpoint or its ``.safetensors`` export to start from (null: the denoiser loads its own pretrained folder)."""
        super().__init__(base_weights)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA: rank must be an integer > 0, got {rank!r}")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"LoRA: alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA: dropout must be in [0, 1), got {dropout!r}")
        if not target_modules:
            raise ValueError("LoRA: target_modules is empty; name the linear layers to adapt (e.g. [qkv, proj])")
        self.target_modules = list(target_modules)
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.dropout, self.merge_for_sampling = dropout, merge_for_sampling

    def matched_layers(self, denoiser: nn.Module) -> list[str]:
        """Paths (inside ``denoiser``) of the linear layers the targets match; a target matching none is an error."""
        linear = [name for name, m in denoiser.named_modules() if isinstance(m, nn.Linear)]
        matched: list[str] = []
        for target in self.target_modules:
            hits = [name for name in linear if name == target or name.endswith("." + target)]
            if not hits:
                leaves = sorted({".".join(name.split(".")[-2:]) if name.split(".")[-1].isdigit()
                                 else name.split(".")[-1] for name in linear})
                raise ValueError(f"LoRA: target module {target!r} matches no linear layer of the denoiser "
                                 f"{type(denoiser).__name__}; its linear layers end in: {', '.join(leaves)}")
            matched += [name for name in hits if name not in matched]
        return matched

    def select_trainable(self, modules: nn.ModuleDict) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        denoiser = modules["denoiser"]
        layers = self.matched_layers(denoiser)
        modules.requires_grad_(False)
        # Exact paths, so peft adapts exactly the layers checked above (its own matching would also accept
        # non-linear modules).
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=layers)
        inject_adapter_in_model(config, denoiser, adapter_name=ADAPTER_NAME)
        for layer in lora_layers(denoiser).values():
            for adapter in (layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]):
                adapter.requires_grad_(True)
        trained = sum(p.numel() for p in modules.parameters() if p.requires_grad)
        log.info("LoRA: rank %d on %d layers, %d trainable parameters", self.rank, len(layers), trained)

    def merge(self, denoiser: nn.Module) -> None:
        if self.merge_for_sampling:
            for layer in lora_layers(denoiser).values():
                layer.merge(adapter_names=[ADAPTER_NAME])

    def unmerge(self, denoiser: nn.Module) -> None:
        for layer in lora_layers(denoiser).values():
            if layer.merged:
                layer.unmerge()

    def export(self, denoiser: nn.Module, folder: Path) -> Path:
        return save_diffusers_lora(denoiser, Path(folder) / DIFFUSERS_LORA_FILE)


class FullFineTuning(FineTuning):
    """Every weight of the trained modules trains except those matching ``freeze``."""

    def __init__(self, freeze: list[str] | None = None, base_weights: str | None = None) -> None:
        """``freeze``: ``fnmatch`` patterns over the trained parameters' names (their checkpoint keys), e.g.
        ``conditioner.*`` (the text encoder), ``denoiser.blocks.0.*`` (the first block), ``denoiser.*norm*``; each
        must match at least one parameter. ``base_weights``: a Kinetoscope checkpoint or its ``.safetensors`` export
        to start from (null: the plugins load their own pretrained folders)."""
        super().__init__(base_weights)
        self.freeze = list(freeze or [])

    def select_trainable(self, modules: nn.ModuleDict) -> None:
        names = [name for name, _ in modules.named_parameters()]
        for pattern in self.freeze:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                roots = sorted({name.split(".", 2)[0] + "." + name.split(".", 2)[1] for name in names if "." in name})
                raise ValueError(f"FullFineTuning: freeze pattern {pattern!r} matches no parameter; parameter names "
                                 f"start with: {', '.join(roots[:20])}")
        for name, p in modules.named_parameters():
            p.requires_grad_(not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.freeze))


# ------------------------------------------------------------------------------------------------ base weights
def load_base_weights(modules: nn.ModuleDict, path: str | Path) -> None:
    """Load the ``modules``' weights from a Kinetoscope checkpoint or safetensors export (keys ``denoiser.*`` ...)."""
    from framework.training.checkpointing import SAFETENSORS_SUFFIX, load_checkpoint_safely, load_safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuning base_weights {path} does not exist")
    state = load_safetensors(path) if path.suffix == SAFETENSORS_SUFFIX else load_checkpoint_safely(path)["state_dict"]
    expected = modules.state_dict()
    missing = [key for key in expected if key not in state]
    if missing:
        raise ValueError(f"fine-tuning base_weights {path} lacks {len(missing)} weights of this model, e.g. "
                         f"{', '.join(missing[:5])} (was it written for another configuration?)")
    wrong = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
             if state[key].shape != value.shape]
    if wrong:
        raise ValueError(f"fine-tuning base_weights {path}: shapes differ from this model's: {'; '.join(wrong[:5])}")
    modules.load_state_dict({key: state[key] for key in expected})


# ---------------------------------------------------------------------------------------------- checkpoints
def _averaged_prefixes(module: nn.Module) -> list[str]:
    """State-dict prefixes of the EMA ``AveragedModel``s inside ``module``."""
    return [name + "." for name, m in module.named_modules() if isinstance(m, AveragedModel) and name]


def frozen_state(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state that training does not change, by state-dict key: frozen parameters (every alias of a
    tied one) and buffers, outside its EMA copies."""
    averaged = _averaged_prefixes(module)
    return {key: value for key, value in module.state_dict(keep_vars=True).items()
            if not (isinstance(value, nn.Parameter) and value.requires_grad)
            and not any(key.startswith(prefix) for prefix in averaged)}


def frozen_fingerprint(module: nn.Module) -> str:
    """A digest of the frozen state (names, shapes, dtypes and the values at both ends of each tensor), cheap enough
    for a 14B model, that tells a different base (another folder, another random initialisation) apart; buffers are
    in it, so one that training changed (BatchNorm statistics) makes a resume fail instead of silently differ."""
    digest = hashlib.sha256()
    for name, value in frozen_state(module).items():
        flat = value.detach().reshape(-1)
        ends = torch.cat([flat[:_FINGERPRINT_ELEMENTS], flat[-_FINGERPRINT_ELEMENTS:]]).cpu().contiguous()
        digest.update(f"{name}|{tuple(value.shape)}|{value.dtype}".encode())
        digest.update(ends.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of ``frozen_state`` and of their copies in ``module``'s EMA ``AveragedModel``s (the EMA's
    own ``n_averaged`` stays)."""
    frozen = set(frozen_state(module))
    return frozen | {f"{prefix}module.{key}" for prefix in _averaged_prefixes(module) for key in frozen}


def prune_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Drop the frozen weights from ``checkpoint["state_dict"]`` and record their fingerprint."""
    drop = frozen_state_keys(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in drop}
    checkpoint[FINGERPRINT_KEY] = frozen_fingerprint(module)


def complete_checkpoint(module: nn.Module, checkpoint: dict[str, Any], source: str = "the checkpoint") -> None:
    """Fill the frozen weights a pruned checkpoint left out from ``module`` (built from the same configuration),
    after checking that they are the weights it was trained against."""
    recorded = checkpoint.get(FINGERPRINT_KEY)
    if recorded is None:
        return  # a full checkpoint (e.g. of the base run): every weight is in it
    if recorded != frozen_fingerprint(module):
        raise ValueError(f"{source} was trained against other frozen base weights than this model has (another "
                         f"pretrained folder or base_weights file, or a base without a fixed seed); resuming would "
                         f"not be exact")
    state = checkpoint["state_dict"]
    for key, value in module.state_dict().items():
        state.setdefault(key, value)


# ------------------------------------------------------------------------------------------------ LoRA export
def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """peft's LoRA layers in ``module`` by path."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def diffusers_root(denoiser: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the diffusers model inside a denoiser adapter (the outermost ``PeftAdapterMixin``, e.g. a
    ``WanTransformer3DModel``), whose module paths are the ones diffusers' LoRA keys use; ("", denoiser) when there
    is none (our own DiT family: the keys are then the paths inside the denoiser)."""
    try:
        from diffusers.loaders.peft import PeftAdapterMixin
    except ImportError:
        return "", denoiser
    for name, m in denoiser.named_modules():  # named_modules lists parents before children
        if isinstance(m, PeftAdapterMixin):
            return name, m
    return "", denoiser


def diffusers_lora_state_dict(denoiser: nn.Module) -> dict[str, Tensor]:
    """The adapters as ``transformer.<path>.lora_A.weight`` [rank, in] / ``.lora_B.weight`` [out, rank], the
    ``alpha / rank`` scale folded into B so that any loader (diffusers assumes alpha = rank when none is given)
    applies the same update."""
    _, root = diffusers_root(denoiser)
    layers = lora_layers(root)
    if not layers:
        raise ValueError(f"{type(denoiser).__name__} holds no LoRA adapters to export")
    state = {}
    for path, layer in layers.items():
        if layer.merged:
            raise ValueError(f"LoRA layer {path} is merged into its weights; unmerge before exporting")
        scale = layer.scaling[ADAPTER_NAME]
        state[f"transformer.{path}.lora_A.weight"] = layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu()
        state[f"transformer.{path}.lora_B.weight"] = (layer.lora_B[ADAPTER_NAME].weight.detach().float() * scale).cpu()
    return state


def save_diffusers_lora(denoiser: nn.Module, path: str | Path) -> Path:
    """Write the denoiser's adapters as safetensors that ``pipeline.load_lora_weights(path.parent)`` (or the file)
    loads; atomic, with a ``.sha256`` sidecar."""
    state = {k: v.contiguous() for k, v in diffusers_lora_state_dict(denoiser).items()}
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    (rank,) = ranks
    targets = sorted({k[len("transformer."):-len(".lora_A.weight")] for k in state if k.endswith("lora_A.weight")})
    # diffusers' own metadata key: LoraConfig arguments under the component's prefix (the scale is already in B).
    config = {"transformer.r": rank, "transformer.lora_alpha": rank, "transformer.target_modules": targets}
    metadata = {"format": "pt", "source": "kinetoscope", "lora_adapter_metadata": json.dumps(config, sort_keys=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_verified(path, lambda f: f.write(save(state, metadata=metadata)))
    return path
