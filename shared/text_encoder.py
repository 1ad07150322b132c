"""Captions -> multi-layer LLM hidden states. The one code path that both ``encode-text`` and the sampling
pipeline use, so that a prompt at sampling time is encoded exactly as the training captions were.

Prompt format (the reference's): ``instruction + caption`` with no separator, default instruction
"Describe this image."; the null caption is the instruction alone. With ``chat_template`` the same text
is sent as one user message through the tokenizer's chat template (generation prompt appended).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from semroute.shared.errors import SemrouteError
from semroute.shared.dtypes import dtype_name
from semroute.shared.llm import LoadedLLM

DEFAULT_INSTRUCTION = "Describe this image."


@dataclass(frozen=True)
class PromptFormat:
    instruction: str = DEFAULT_INSTRUCTION
    chat_template: bool = False
    max_length: int = 512

    def render(self, caption: str, tokenizer) -> str:
        text = self.instruction + caption
        if not self.chat_template:
            return text
        if not getattr(tokenizer, "chat_template", None):
            raise SemrouteError("--chat-template was given but this tokenizer has no chat template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    n_full: int  # tokens before truncation

    @property
    def truncated(self) -> bool:
        return self.n_full > len(self.ids)


class TextEncoder:
    """Tokenizes captions and returns the selected ``hidden_states`` layers, right-padded with a mask.

    Right padding keeps every real token at the position it has when the caption is run alone, and the
    causal mask keeps real tokens from ever attending to pads, so a caption's features do not depend on
    its batch-mates (up to the rounding of differently shaped matmuls).
    """

    def __init__(self, llm: LoadedLLM, fmt: PromptFormat, layers: list[int]):
        bad = [i for i in layers if not 0 <= i <= llm.num_hidden_layers]
        if bad:
            raise SemrouteError(f"layers {bad} do not exist in {llm.ref} (hidden_states 0..{llm.num_hidden_layers})")
        self.llm = llm
        self.fmt = fmt
        self.layers = list(layers)
        tok = llm.tokenizer
        self.pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None))
        # An empty instruction makes the null caption empty; zero tokens would leave attention nothing
        # to attend to, so such a text is encoded as the single BOS (else EOS) token instead.
        self.fallback_id = next((i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None), None)

    # -- tokenizing ---------------------------------------------------------------------------
    def tokenize(self, captions: list[str]) -> list[Tokenized]:
        tok = self.llm.tokenizer
        texts = [self.fmt.render(c, tok) for c in captions]
        enc = tok(texts, add_special_tokens=not self.fmt.chat_template, truncation=False)["input_ids"]
        out = []
        for ids in enc:
            if not ids:
                if self.fallback_id is None:
                    raise SemrouteError("an empty text has no tokens and this tokenizer has no BOS/EOS to stand in")
                ids = [self.fallback_id]
            out.append(Tokenized(ids=list(ids[: self.fmt.max_length]), n_full=len(ids)))
        return out

    def null_caption(self) -> Tokenized:
        """The instruction alone: the condition for caption dropout and classifier-free guidance."""
        return self.tokenize([""])[0]

    # -- running the LLM ----------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one right-padded batch of token id lists.

        Returns:
            features: ``[B, T, L, D]`` in the compute dtype, T = longest in the batch, L = len(layers).
            mask: ``[B, T]`` bool, True on real tokens.
        """
        device = self.llm.device
        lengths = torch.tensor([len(ids) for ids in batch])
        t_max = int(lengths.max())
        input_ids = torch.full((len(batch), t_max), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask = torch.arange(t_max)[None, :] < lengths[:, None]  # [B, T]
        out = self.llm.decoder(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device=device, dtype=torch.long),
            output_hidden_states=True,
            use_cache=False,
        )
        states = out.hidden_states
        features = torch.stack([states[i] for i in self.layers], dim=2)  # [B, T, L, D]
        return features, mask.to(device)

    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        """Convenience: each caption's ``[n_tokens, L, D]`` features, run as one batch."""
        tokenized = self.tokenize(captions)
        features, _ = self.forward([t.ids for t in tokenized])
        return [features[i, : len(t.ids)] for i, t in enumerate(tokenized)]

    def fingerprint(self) -> dict:
        """What decides the stored numbers: model, tokenizer, prompt format, layers and compute dtype."""
        ident = self.llm.identity
        return {
            "llm_ref": ident["ref"],
            "llm_weights_sha256": ident["weights_sha256"],
            "llm_architecture": ident["architecture"],
            "llm_num_hidden_layers": ident["num_hidden_layers"],
            "llm_hidden_size": ident["hidden_size"],
            "tokenizer_sha256": ident["tokenizer_sha256"],
            **{f"prompt_{k}": v for k, v in asdict(self.fmt).items()},
            "layers": self.layers,
            "compute_dtype": dtype_name(self.llm.dtype),
        }
