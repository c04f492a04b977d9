"""BLIP pretraining: ITC + ITM + image-grounded LM, with the paper's encoder-decoder weight sharing."""
from __future__ import annotations

from typing import Any, Mapping

from vlforge.models.blip.decoder import language_model_loss, special_token_ids
from vlforge.models.blip.retrieval import BlipRetrieval
from vlforge.models.layers.bert import BertLMHead, BertTextModel
from vlforge.models.output import ModelOutput


def share_all_but_self_attention(encoder: BertTextModel, decoder: BertTextModel) -> None:
    """Make `decoder` use the encoder's embeddings, cross-attention and feed-forward modules.

    BLIP's text encoder and decoder differ only in their self-attention layers (bidirectional vs
    causal); everything else is one set of weights trained by both ITC/ITM and LM.
    """
    decoder.word_embeddings = encoder.word_embeddings
    decoder.position_embeddings = encoder.position_embeddings
    decoder.token_type_embeddings = encoder.token_type_embeddings
    decoder.embed_norm = encoder.embed_norm
    for enc_layer, dec_layer in zip(encoder.layers, decoder.layers):
        for name in ("cross_attention", "intermediate", "output", "norm"):
            setattr(dec_layer, name, getattr(enc_layer, name))


class BlipPretrain(BlipRetrieval):
    """BlipRetrieval's ITC and ITM plus captioning LM on a decoder that shares all but self-attention.

    Losses are logged as itc, itm and lm; the training loss is their sum.
    """

    def __init__(
        self,
        vision: Mapping[str, Any],
        text: Mapping[str, Any],
        embed_dim: int = 256,
        tokenizer: str | None = None,
        prompt: str = "",
        label_smoothing: float = 0.0,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        share_weights: bool = True,
        **retrieval_kwargs: Any,
    ) -> None:
        super().__init__(vision, text, embed_dim, **retrieval_kwargs)
        self.text_decoder = BertTextModel(**{"cross_attention_layers": "all", "encoder_width": self.vision.width, **text})
        if share_weights:
            share_all_but_self_attention(self.text_encoder, self.text_decoder)
        self.lm_head = BertLMHead(self.text_decoder.width, text["vocab_size"],
                                  tied_embedding=self.text_decoder.word_embeddings)
        self.label_smoothing = label_smoothing
        self.bos_token_id, self.eos_token_id, self.pad_token_id, self.prompt_length = special_token_ids(
            tokenizer, prompt, bos_token_id, eos_token_id, pad_token_id, None)

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        contrastive = super().forward(batch)
        image_tokens = contrastive.extras["image_tokens"]
        input_ids = batch["text_input_ids"].clone()
        input_ids[:, 0] = self.bos_token_id
        mask = batch["text_attention_mask"]
        hidden = self.text_decoder(input_ids, mask, encoder_hidden_states=image_tokens, causal=True)
        lm = language_model_loss(self.lm_head(hidden), input_ids, mask, self.prompt_length, self.label_smoothing)
        losses = {**contrastive.losses, "lm": lm.detach()}
        return ModelOutput(loss=contrastive.loss + lm, losses=losses)
