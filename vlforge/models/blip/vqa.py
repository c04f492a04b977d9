"""BLIP VQA: an image-grounded question encoder and an answer decoder that attends to the question."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.core.tokenizers import load_tokenizer, special_token_id, tokenize_texts
from vlforge.models.blip.decoder import (
    decode,
    language_model_loss,
    lm_labels,
    special_token_ids,
)
from vlforge.models.layers.bert import BertLMHead, BertTextModel
from vlforge.models.layers.generation import GenerationConfig
from vlforge.models.output import ModelOutput
from vlforge.models.towers.build import build_vision_tower


class BlipVQA(nn.Module):
    """Questions arrive as `question_input_ids/attention_mask`, answers (training) as
    `answer_input_ids/attention_mask`, both `[CLS] ... [SEP]` from the collator; the decoder reads
    `[DEC] answer [SEP]` and every answer token is scored. With several questions per image the batch
    carries `question_sample_index` (the image row of each question): each image is encoded once.

    ALBEF's VQA model is the same design with two differences, set by arguments: its question encoder
    fuses the image only from `fusion_layer` up (layers below are text-only), and its answer decoder
    has `decoder_layers` (6) of the encoder's 12.

    `enc_token_id` (an id, or a token of the tokenizer): the question encoder reads it in place of
    [CLS], as LAVIS's BLIP VQA does with [ENC]; None keeps [CLS] (transformers' BLIP).
    `label_smoothing` applies to the training loss and to rank mode, which ranks candidates by that
    loss (LAVIS: 0.1; with 0 it is their log-likelihood). The training loss is the mean over answer
    tokens; a batch with `answer_weight` (VQASample's weighted answers) gets LAVIS's instead: each
    answer's summed token loss times its weight, summed and divided by the number of images.
    `answer_attends_question_padding`: generated answers cross-attend to the question's padding
    positions too, as LAVIS's and transformers' BLIP VQA generate (an all-ones question mask); off,
    padding is masked as in training and ranking.
    """

    def __init__(
        self,
        vision: Mapping[str, Any],
        text: Mapping[str, Any],
        tokenizer: str | None = None,
        label_smoothing: float = 0.0,
        bos_token_id: int | str | None = None,
        eos_token_id: int | str | None = None,
        pad_token_id: int = 0,
        fusion_layer: int = 0,
        decoder_layers: int | None = None,
        enc_token_id: int | str | None = None,
        answer_attends_question_padding: bool = False,
    ) -> None:
        super().__init__()
        self.compile_decoding = False  # generate through a compiled static-shape step (load_model(compile=True))
        self.vision = build_vision_tower(vision)
        layers = text.get("layers", 12)
        if not 0 <= fusion_layer < layers:
            raise ValueError(f"fusion_layer must be between 0 and text.layers-1 ({layers - 1}), got {fusion_layer}")
        self.text_encoder = BertTextModel(**{**text, "cross_attention_layers": range(fusion_layer, layers),
                                             "encoder_width": self.vision.width})
        width = self.text_encoder.width
        self.text_decoder = BertTextModel(**{**text, "layers": decoder_layers or layers,
                                             "cross_attention_layers": "all", "encoder_width": width})
        self.lm_head = BertLMHead(width, text["vocab_size"], tied_embedding=self.text_decoder.word_embeddings)
        self.tokenizer_name, self.label_smoothing = tokenizer, label_smoothing
        # An id, or a token of the tokenizer (ALBEF's answers start with "[CLS]": BERT's has no bos).
        bos_token_id = special_token_id(tokenizer, bos_token_id, "bos_token_id")
        eos_token_id = special_token_id(tokenizer, eos_token_id, "eos_token_id")
        self.bos_token_id, self.eos_token_id, self.pad_token_id, _ = special_token_ids(
            tokenizer, "", bos_token_id, eos_token_id, pad_token_id, 1)
        self.enc_token_id = special_token_id(tokenizer, enc_token_id, "enc_token_id")
        self.answer_attends_question_padding = answer_attends_question_padding

    def question_states(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Question encoder states [Q, L, D]; `image_index` [Q] picks each question's image row
        (default: question i asks about image i)."""
        _, image_tokens = self.vision(image)
        if image_index is not None:
            image_tokens = image_tokens[image_index]
        if self.enc_token_id is not None:
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.enc_token_id
        return self.text_encoder(input_ids, attention_mask, encoder_hidden_states=image_tokens)

    def answer_logits(self, question: torch.Tensor, question_mask: torch.Tensor, answer_ids: torch.Tensor,
                      answer_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_decoder(answer_ids, answer_mask, encoder_hidden_states=question,
                                   encoder_attention_mask=question_mask, causal=True)
        return self.lm_head(hidden)

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        q_ids, q_mask = batch["question_input_ids"], batch["question_attention_mask"]
        question = self.question_states(batch["image"], q_ids, q_mask, batch.get("question_sample_index"))
        answer_ids = batch["answer_input_ids"].clone()
        answer_ids[:, 0] = self.bos_token_id
        answer_mask = batch["answer_attention_mask"]
        logits = self.answer_logits(question, q_mask, answer_ids, answer_mask)
        if "answer_weight" not in batch:
            loss = language_model_loss(logits, answer_ids, answer_mask, 1, self.label_smoothing)
            return ModelOutput(loss=loss, losses={"vqa": loss.detach()})
        # LAVIS's objective: each answer's loss summed over its tokens, times its weight, summed over
        # the batch's answers and divided by its images.
        weights = torch.tensor([w for row in batch["answer_weight"] for w in row], dtype=torch.float32,
                               device=logits.device)
        if weights.shape[0] != answer_ids.shape[0]:
            raise ValueError(f"answer_weight: {weights.shape[0]} weights for {answer_ids.shape[0]} answers")
        loss = (weights * self._answer_losses(logits, answer_ids, answer_mask)).sum() / batch["image"].shape[0]
        return ModelOutput(loss=loss, losses={"vqa": loss.detach()})

    @torch.no_grad()
    def generate_answer_ids(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                            max_length: int = 10, num_beams: int = 1,
                            image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Answers [Q, <= max_length] starting with the bos id, padded after [SEP] (greedy, or beam search)."""
        question = self.question_states(image, question_ids, question_mask, image_index)
        if self.answer_attends_question_padding:
            question_mask = torch.ones_like(question_mask)
        start = torch.full((question.shape[0], 1), self.bos_token_id, dtype=torch.long, device=image.device)
        # One context row per question, shared by its beams (their cross-attention keys computed once).
        return decode(self.text_decoder, self.lm_head, question, question_mask, start,
                      GenerationConfig(max_length=max_length, num_beams=num_beams), self.eos_token_id, self.pad_token_id,
                      self.compile_decoding)

    @torch.no_grad()
    def rank_answers(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                     answer_ids: torch.Tensor, answer_mask: torch.Tensor, k: int | None = 128,
                     image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Index [Q] of the best candidate answer per question: BLIP's rank mode. Candidates
        (`answer_ids` [C, L], `[CLS] answer [SEP]` from the tokenizer) are pre-filtered to the `k`
        whose first token is likeliest, then ranked by the answer loss (summed over its tokens, with the
        model's label smoothing: the log-likelihood when that is 0)."""
        question = self.question_states(image, question_ids, question_mask, image_index)
        batch, count = question.shape[0], answer_ids.shape[0]
        answer_ids = answer_ids.clone()
        answer_ids[:, 0] = self.bos_token_id
        start = answer_ids[:1, :1].expand(batch, 1)
        first = self.answer_logits(question, question_mask, start, torch.ones_like(start))[:, 0].float().log_softmax(-1)
        k = count if k is None else min(k, count)
        first_scores = first[:, answer_ids[:, 1]]  # [B, C]
        top = first_scores.topk(k, dim=1).indices  # [B, k]
        ids, mask = answer_ids[top].flatten(0, 1), answer_mask[top].flatten(0, 1)  # [B*k, L]
        logits = self.answer_logits(question.repeat_interleave(k, dim=0), question_mask.repeat_interleave(k, dim=0),
                                    ids, mask)
        scores = -self._answer_losses(logits, ids, mask).view(batch, k)
        return top.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)

    def _answer_losses(self, logits: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """[N]: each answer's loss summed over its tokens, with the model's label smoothing."""
        labels = lm_labels(answer_ids, answer_mask, 1)[:, 1:]
        token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                     reduction="none", label_smoothing=self.label_smoothing)
        return token_loss.view(labels.shape).sum(dim=1)

    def predict_answers(self, samples: Mapping[str, Any], max_length: int = 10, num_beams: int = 1,
                        max_question_len: int = 35) -> list[str]:
        """Free-form answers about `samples["image"]` to the questions in `samples["text_input"]` (strings,
        one per image, as LAVIS takes them) or, from the collator, `question_input_ids/attention_mask`
        (the image row of each in `question_sample_index` when present)."""
        if self.tokenizer_name is None:
            raise ValueError("predict_answers needs the model's tokenizer; use generate_answer_ids with ids")

        tok = load_tokenizer(self.tokenizer_name)
        if "question_input_ids" in samples:
            ids, mask = samples["question_input_ids"], samples["question_attention_mask"]
        else:
            questions = samples["text_input"]
            questions = [questions] if isinstance(questions, str) else list(questions)
            if len(questions) != samples["image"].shape[0]:
                raise ValueError(f"predict_answers: {len(questions)} questions for {samples['image'].shape[0]} images")
            ids, mask = tokenize_texts(self.tokenizer_name, questions, max_question_len, samples["image"].device)
        ids = self.generate_answer_ids(samples["image"], ids, mask, max_length, num_beams,
                                       samples.get("question_sample_index"))
        return [a.strip() for a in tok.batch_decode(ids[:, 1:], skip_special_tokens=True)]
