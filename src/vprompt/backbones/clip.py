"""CLIP-family backbones over open_clip: the image-text seam every text-prompt method uses."""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from vprompt.backbones import clip_vision
from vprompt.backbones.clip_files import file_format, load_openai_state, torchscript_error
from vprompt.backbones.downloads import download_advice, offline_unless_reachable, unreachable
from vprompt.backbones.fingerprint import weights_fingerprint
from vprompt.backbones.preprocess import Preprocess, build_eval_transform
from vprompt.backbones.protocols import NotAViTError
from vprompt.backbones.registry import (
    RANDOM_INIT,
    RANDOM_INIT_SEED,
    BackboneFamily,
    unknown_weights_error,
)
from vprompt.backbones.text_prefix import (
    check_deep,
    encode_shared_prefix,
    prefix_sharing_problem,
    replace_tokens,
)
from vprompt.errors import WeightsError

_CONFIG_DIR = Path(__file__).parent / "model_configs"
# Short public names → the open_clip config names our bundled configs register under.
TINY_ARCHS = {"tiny": "vprompt-tiny"}
_CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
    "model.pth",
)
_registered_configs = False
_VIT_ONLY = frozenset({"num_prefix_tokens", "vision_width", "vision_blocks"})


def _open_clip() -> Any:
    global _registered_configs
    import open_clip

    if not _registered_configs:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered_configs = True
    return open_clip


def list_archs() -> list[str]:
    oc = _open_clip()
    internal = set(TINY_ARCHS.values())
    return list(TINY_ARCHS) + [m for m in oc.list_models() if m not in internal]


def list_tags(arch: str) -> list[str]:
    if arch in TINY_ARCHS:
        return []
    return list(_open_clip().list_pretrained_tags_by_model(arch))


def default_weights(arch: str) -> str:
    tags = list_tags(arch)
    if "openai" in tags:
        return "openai"
    return tags[0] if tags else RANDOM_INIT


class ClipBackbone(nn.Module):
    """A frozen open_clip model behind vprompt's :class:`ImageTextBackbone` protocol.

    ViT towers also implement :class:`TokenBackbone` (``is_vit``); ResNet towers raise
    :class:`NotAViTError` from its members.
    Shapes: B images, T texts, L tokens, W text width, D joint embedding size.
    """

    model: Any
    _text: Any  # open_clip towers expose parts as dynamic nn.Module attributes

    def __init__(
        self, *, model: nn.Module, tokenizer: Any, name: str, weights: str, preprocess: Preprocess
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.weights = weights
        self.preprocess = preprocess
        self._tokenizer = tokenizer
        self._transform = build_eval_transform(preprocess)
        self._vision_layout = clip_vision.vision_layout(model.visual)
        self.is_vit = self._vision_layout is not None
        text = getattr(model, "text", None)
        # CLIP keeps the text tower's parts on the model itself; CustomTextCLIP nests them.
        self._text = model if text is None else text
        self._seam_problem = self._check_seam()
        self._prefix_problem = self._seam_problem or prefix_sharing_problem(self._text)
        self.context_length = int(getattr(tokenizer, "context_length", 77))
        self.embed_dim = int(self._infer_embed_dim())
        self.text_width = (
            int(self._text.token_embedding.weight.shape[1]) if self._seam_problem is None else 0
        )

    # ------------------------------------------------------------------ images
    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image → 3 x H x W tensor, exactly as the weights were trained to expect."""
        return self._transform

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_image_prompted(
        self, images: torch.Tensor, prompts: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Image features with deep vision prompts (IVLP / MaPLe / PromptSRC).

        ``prompts[0]`` (n x D) is appended after the patch tokens, before the tower's pre-norm
        (``ln_pre``), as the reference towers append it; ``prompts[k]`` replaces the last n
        tokens entering block ``k``. The prompt tokens are dropped after the last block, so
        the tower's own pooling sees only its own tokens. With no prompts this is
        :meth:`encode_image`.

        Args:
            images: B x 3 x H x W preprocessed pixels.
            prompts: J tensors of n x D (J ≤ the number of blocks), shared by every image.

        Returns:
            B x E image features (not normalized).
        """
        if not prompts:
            return self.encode_image(images)
        return clip_vision.prompted_features(
            self.model.visual, self._require_vit(), images, prompts
        )

    # ------------------------------------------------------------------ vision tokens (VPT)
    @property
    def num_prefix_tokens(self) -> int:
        """P: tokens before the patch tokens (the class token)."""
        return clip_vision.num_prefix_tokens(self.model.visual, self._require_vit())

    @property
    def vision_width(self) -> int:
        """D, the vision tower's token width."""
        return clip_vision.vision_width(self.model.visual, self._require_vit())

    def vision_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W preprocessed pixels → B x (P + N) x D, exactly what enters block 0."""
        return clip_vision.vision_tokens(self.model.visual, self._require_vit(), pixels)

    @property
    def vision_blocks(self) -> nn.ModuleList:
        """The vision tower's transformer blocks in order, each B x L x D → B x L x D."""
        return clip_vision.blocks(self.model.visual, self._require_vit())  # type: ignore[return-value]

    def pool_vision_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x L x D after the last block → B x D_embed, equal to :meth:`encode_image`."""
        return clip_vision.pool_tokens(self.model.visual, self._require_vit(), tokens)

    def project_vision_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x L x D tokens → B x L x E joint-space features: the final norm and projection
        applied to every token, so patch tokens compare with text features."""
        return clip_vision.project_tokens(self.model.visual, self._require_vit(), tokens)

    def _require_vit(self) -> clip_vision.VisionLayout:
        if self._vision_layout is None:
            visual = self.model.visual
            trunk = getattr(visual, "trunk", None)
            tower = type(visual).__name__ + (f" over {type(trunk).__name__}" if trunk else "")
            raise NotAViTError(
                f"{self.name}: its vision tower ({tower}) is not a plain vision transformer "
                "(blocks mapping B x L x D → B x L x D); token prompts need a ViT CLIP such as "
                "clip:ViT-B-16"
            )
        return self._vision_layout

    def __getattr__(self, name: str) -> Any:
        # A ViT-only property raised NotAViTError (an AttributeError), so Python fell back to
        # here; raise it again rather than let nn.Module replace it with a bare "no attribute".
        if name in _VIT_ONLY and self.__dict__.get("_vision_layout", "") is None:
            self._require_vit()
        return super().__getattr__(name)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts)).to(self.logit_scale.device)

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        pool = self._pool_type
        if pool == "argmax":
            return tokens.argmax(dim=-1)
        if pool == "eos":
            return (tokens == self._text_attr("text_eos_id", "eos_id")).int().argmax(dim=-1)
        # first/last pooling: the last real (non-pad) token bounds the useful length.
        pad = self._text_attr(None, "pad_id", default=0)
        return ((tokens != pad).int().cumsum(-1).argmax(-1)).long()

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        self._require_seam()
        return self._text.token_embedding(tokens)

    def token_embedding_table(self) -> torch.Tensor:
        """V x W: the frozen token-embedding table (row i embeds token id i), detached."""
        self._require_seam()
        return self._text.token_embedding.weight.detach()

    def decode_token(self, token_id: int) -> str:
        """The text of one vocabulary token (a BPE piece; word-final pieces lose their marker).

        Raises:
            WeightsError: The tokenizer has no decoder (it cannot map ids back to text).
        """
        tok = self._tokenizer
        decode = getattr(tok, "decode", None) or getattr(
            getattr(tok, "tokenizer", None), "decode", None
        )
        if decode is None:
            raise WeightsError(f"{self.name}: its tokenizer cannot decode token ids")
        return str(decode([int(token_id)])).strip()

    def encode_text_embeddings(
        self,
        embeddings: torch.Tensor,
        eot_index: torch.Tensor,
        deep: Sequence[torch.Tensor] = (),
        deep_start: int = 1,
    ) -> torch.Tensor:
        """Text features from token embeddings (the CoOp seam; deep prompts for IVLP/MaPLe).

        Args:
            embeddings: T x L x W token embeddings, L ≤ context length (positions are added here).
            eot_index: T positions of the pooled token.
            deep: Deep text prompts: ``deep[k]`` (n x W, the same for every prompt) replaces
                the hidden states at positions ``deep_start … deep_start + n - 1`` entering
                block ``k + 1`` (the prompt positions of block 0 are in ``embeddings``).
            deep_start: The first replaced position (1: right after the start token).

        Returns:
            T x D text features, equal to open_clip's ``encode_text`` for the same tokens when
            ``deep`` is empty.
        """
        self._require_seam()
        t = self._text
        cast = t.transformer.get_cast_dtype()
        n = embeddings.shape[1]
        x = embeddings.to(cast) + t.positional_embedding[:n].to(cast)
        mask = t.attn_mask
        if mask is not None:
            mask = mask[:n, :n]
        if getattr(t, "use_pad_mask", False):
            keep = torch.arange(n, device=x.device)[None, :] <= eot_index[:, None]  # T x L
            pad = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(
                ~keep, float("-inf")
            )
            pad = pad[:, None, :].expand(-1, n, -1).repeat_interleave(t.heads, 0)
            mask = pad if mask is None else mask[None] + pad
        if deep:
            x = self._deep_text_blocks(x, mask, deep, deep_start)
        else:
            x = t.transformer(x, attn_mask=mask)
        x = t.ln_final(x)
        pool = self._pool_type
        if pool in ("argmax", "eos"):
            x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        elif pool == "first":
            x = x[:, 0]
        elif pool == "last":
            x = x[:, -1]
        proj = t.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x

    def _deep_text_blocks(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        deep: Sequence[torch.Tensor],
        start: int,
    ) -> torch.Tensor:
        """open_clip's ``Transformer.forward`` with deep prompts swapped in before blocks
        1 … len(deep)."""
        transformer = self._text.transformer
        blocks = transformer.resblocks
        check_deep(deep, len(blocks), start, x.shape[1], "the prompt")
        batch_first = getattr(transformer, "batch_first", True)
        for i, block in enumerate(blocks):
            if 1 <= i <= len(deep):
                x = replace_tokens(x, deep[i - 1], start)
            if batch_first:
                x = block(x, attn_mask=mask)
            else:
                x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        return x

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._seam_problem is not None:
            return self.model.encode_text(tokens)
        eot = self.eot_index(tokens)
        if self.truncatable:
            # Causal tower: tokens after the pooled one cannot change its feature.
            tokens = tokens[:, : int(eot.max()) + 1]
        return self.encode_text_embeddings(self.embed_tokens(tokens), eot)

    @property
    def text_layers(self) -> int:
        """Blocks of the text tower (0 when the token seam is unavailable)."""
        if self._seam_problem is not None:
            return 0
        return len(self._text.transformer.resblocks)

    @property
    def truncatable(self) -> bool:
        """Whether text batches may be cut to the longest real prompt without changing results."""
        return (
            self._seam_problem is None
            and self._text.attn_mask is not None
            and self._pool_type in ("argmax", "eos")
        )

    @property
    def shares_text_prefix(self) -> bool:
        """Whether :meth:`encode_text_shared_prefix` works for this text tower (causal, plain
        open_clip blocks, EOT pooling)."""
        return self.truncatable and self._prefix_problem is None

    def encode_text_shared_prefix(
        self,
        prefix: torch.Tensor,
        suffix: torch.Tensor,
        eot_index: torch.Tensor,
        group: torch.Tensor | None = None,
        deep: Sequence[torch.Tensor] = (),
        deep_start: int = 1,
    ) -> torch.Tensor:
        """Text features of T prompts that start with the same P token embeddings.

        Args:
            prefix: P x W token embeddings shared by every prompt (run once), or G x P x W.
            suffix: T x S x W token embeddings after the prefix.
            eot_index: T positions of the pooled token in the whole prompt (≥ P).
            group: With G prefixes, which one each of the T prompts starts with.
            deep: Deep text prompts as in :meth:`encode_text_embeddings`; they must lie inside
                the prefix (deep prompts are the same for every class, so the prefix stays
                shared).
            deep_start: The first replaced position.

        Returns:
            T x D features, equal to :meth:`encode_text_embeddings` of the whole prompts.
        """
        if not self.shares_text_prefix:
            raise WeightsError(
                f"{self.name}: prompts cannot share a prefix because "
                f"{self._prefix_problem or 'its text tower is not causal'}"
            )
        return encode_shared_prefix(
            self._text,
            prefix,
            suffix,
            eot_index,
            pool_type=self._pool_type,
            group=group,
            deep=deep,
            deep_start=deep_start,
        )

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().reshape(())

    @property
    def logit_bias(self) -> torch.Tensor | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else bias.reshape(())

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """A short hash of the weights, to check that a prompt pack meets the same backbone."""
        return weights_fingerprint(self.model)

    # ------------------------------------------------------------------ internals
    @property
    def _pool_type(self) -> str:
        return str(self._text_attr("text_pool_type", "pool_type", default="argmax"))

    def _text_attr(self, clip_name: str | None, tower_name: str, default: Any = None) -> Any:
        if self._text is self.model and clip_name is not None:
            return getattr(self.model, clip_name, default)
        return getattr(self._text, tower_name, default)

    def _check_seam(self) -> str | None:
        t = self._text
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not all(hasattr(t, a) for a in needed):
            return f"its text tower ({type(t).__name__}) is not open_clip's TextTransformer"
        if getattr(t, "cls_emb", None) is not None:
            return "its text tower appends a CLS embedding (CoCa-style)"
        if self._text_attr("text_pool_type", "pool_type", default="argmax") == "none":
            return "its text tower does not pool tokens"
        return None

    def _require_seam(self) -> None:
        if self._seam_problem is not None:
            raise WeightsError(
                f"{self.name}: token-embedding prompts are not supported because "
                f"{self._seam_problem}; zero-shot classification still works"
            )

    def _infer_embed_dim(self) -> int:
        proj = getattr(self._text, "text_projection", None)
        if isinstance(proj, nn.Linear):
            return proj.out_features
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[1])
        with torch.no_grad():
            return int(self.model.encode_text(self._tokenizer(["x"])).shape[-1])


def _resolve_source(arch: str, weights: str) -> dict[str, Any]:
    """Turn a weight source into open_clip ``create_model`` arguments."""
    oc = _open_clip()
    oc_arch = TINY_ARCHS.get(arch, arch)
    if weights == RANDOM_INIT:
        # Without pretrained_text=False, open_clip fills Hugging Face text towers with their
        # pretrained weights (a hub download), so `none` would not mean random init.
        return {
            "model_name": oc_arch,
            "pretrained": None,
            "tokenizer": oc_arch,
            "pretrained_text": False,
        }
    if weights.startswith("hf-hub:"):
        return {"model_name": weights, "pretrained": None, "tokenizer": weights}
    path = Path(weights).expanduser()
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            name = f"local-dir:{path}"
            return {"model_name": name, "pretrained": None, "tokenizer": name}
        found = [path / n for n in _CHECKPOINT_NAMES if (path / n).is_file()]
        if not found:
            raise WeightsError(
                f"weights folder {path} has neither open_clip_config.json nor one of "
                f"{', '.join(_CHECKPOINT_NAMES)}"
            )
        path = found[0]
    if path.is_file():
        found_format = file_format(path)
        if found_format == "torchscript":
            raise torchscript_error(f"clip:{arch}", path)
        if found_format == "openai":
            # OpenAI trained with QuickGELU; its layout is loaded by load_openai_state.
            return {
                "model_name": oc_arch,
                "pretrained": None,
                "tokenizer": oc_arch,
                "force_quick_gelu": True,
                "openai_file": path,
            }
        return {"model_name": oc_arch, "pretrained": str(path), "tokenizer": oc_arch}
    tags = list_tags(arch)
    if weights in tags:
        cfg = oc.get_pretrained_cfg(oc_arch, weights)
        quick = bool(cfg.get("quick_gelu", False)) and not oc_arch.endswith("quickgelu")
        return {
            "model_name": oc_arch,
            "pretrained": weights,
            "tokenizer": oc_arch,
            "force_quick_gelu": quick,
        }
    raise unknown_weights_error(f"clip:{arch}", weights, tags)


def _error_summary(exc: BaseException, limit: int = 600) -> str:
    """The error's lines joined into one; a strict state-dict load lists its keys on later lines."""
    text = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class DownloadNotice(UserWarning):
    """Weights are about to be fetched over the network (it can take minutes, or fail)."""


def _hub_cache() -> str:
    import huggingface_hub.constants as hub

    return str(hub.HF_HUB_CACHE)


def _announce_download(arch: str, weights: str, args: dict[str, Any]) -> tuple[str | None, bool]:
    """The hub repository a tag's weights come from (None for other sources) and whether
    they must be downloaded; says so first, since the fetch can take minutes."""
    if args.get("pretrained") != weights or weights not in list_tags(arch):
        return None, False
    cfg = _open_clip().get_pretrained_cfg(TINY_ARCHS.get(arch, arch), weights)
    repo = str(cfg.get("hf_hub") or "").strip("/")
    if not repo:
        return None, False
    from huggingface_hub import try_to_load_from_cache

    names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    missing = not any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)
    if missing:
        warnings.warn(
            DownloadNotice(
                f"fetching clip:{arch} weights {weights!r} from the Hugging Face hub ({repo}); "
                "this can take minutes"
            ),
            stacklevel=3,
        )
    return repo, missing


def build_clip(arch: str, weights: str, device: torch.device) -> ClipBackbone:
    oc = _open_clip()
    args = _resolve_source(arch, weights)
    tokenizer_name = args.pop("tokenizer")
    openai_file = args.pop("openai_file", None)
    previous_disable = logging.root.manager.disable
    # open_clip logs "initialized randomly" and its download failures as root warnings and
    # errors; we report failures once, as exceptions, instead.
    logging.disable(logging.ERROR)
    hub_repo, fetch = _announce_download(arch, weights, args)
    quick = contextlib.ExitStack()  # no retries against a hub that does not answer
    quick.enter_context(offline_unless_reachable(fetch))
    try:
        if args["pretrained"] is None and args["model_name"] == TINY_ARCHS.get(arch, arch):
            # Random init is seeded so that `none` means the same weights every time.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = oc.create_model(**args, weights_only=True, device="cpu")
        else:
            model = oc.create_model(**args, weights_only=True, device="cpu")
        if openai_file is not None:
            load_openai_state(model, openai_file)
    except pickle.UnpicklingError as exc:
        # torch wraps the reason (a blocked global or opcode) in advice to retry with
        # weights_only=False, which is exactly what must not happen; keep only the reason.
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            detail = f"it references the Python object {found.group(1)}"
        else:
            found = re.search(r"Unsupported [^\n]*", text)
            detail = found.group(0).strip() if found else "it is not a plain tensor file"
        raise WeightsError(
            f"{weights}: refusing to load: the file needs arbitrary unpickling "
            f"(only tensors are accepted): {detail}"
        ) from exc
    except WeightsError:
        raise
    except Exception as exc:  # torch, open_clip and safetensors raise many error types
        if hub_repo is not None and unreachable(exc):
            raise download_advice(
                f"clip:{arch} weights {weights!r}",
                f"Hugging Face hub repository {hub_repo}",
                f"{hub_repo}'s open_clip_pytorch_model.bin (or open_clip_model.safetensors)",
                f"the hub cache ({_hub_cache()})",
            ) from exc
        raise WeightsError(
            f"cannot load clip:{arch} weights from {weights!r}: {_error_summary(exc)}"
        ) from exc
    finally:
        quick.close()
        logging.disable(previous_disable)
    pre_cfg = dict(getattr(model.visual, "preprocess_cfg", {}))
    pre_cfg.pop("mode", None)
    preprocess = Preprocess.from_dict(pre_cfg)
    tokenizer = oc.get_tokenizer(tokenizer_name)
    backbone = ClipBackbone(
        model=model,
        tokenizer=tokenizer,
        name=f"clip:{arch}",
        weights=weights,
        preprocess=preprocess,
    )
    return backbone.to(device)


CLIP_FAMILY = BackboneFamily(
    name="clip",
    description="CLIP-like image-text models from open_clip (OpenAI CLIP, LAION, SigLIP, …)",
    list_archs=list_archs,
    list_tags=list_tags,
    default_weights=default_weights,
    build=build_clip,
    tiny=tuple(TINY_ARCHS),
)
