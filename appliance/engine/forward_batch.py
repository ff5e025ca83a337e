"""The one object a forward pass needs besides the weights and the KV tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """A step's tokens, packed back to back in request order.

    Request ``b`` contributes ``extend_lens[b]`` tokens at positions ``prefix_lens[b] + i``; after
    the step its context length is ``seq_lens[b] = prefix_lens[b] + extend_lens[b]``. Token ``t``
    writes its K/V into slot ``slot_mapping[t]`` (``page * page_size + offset``). ``logit_rows`` are
    the packed-token rows whose logits are wanted (the last token of requests that sample).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    page_table: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    seq_lens: torch.Tensor
    logit_rows: torch.Tensor
    decode_only: bool

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])

    # NOTE: tensor-parallel ranks receive the batch as ONE int64 tensor (no pickle on any wire).
    def pack(self) -> torch.Tensor:
        b, t = self.batch_size, self.num_tokens
        header = torch.tensor(
            [t, b, int(self.page_table.shape[1]), int(self.logit_rows.shape[0]), int(self.decode_only)],
            dtype=torch.int64, device=self.input_ids.device,  # NOTE: one device for the cat (CUDA under NCCL)
        )
        parts = [header, self.input_ids, self.positions, self.slot_mapping, self.page_table.flatten(),
                 self.prefix_lens, self.extend_lens, self.seq_lens, self.logit_rows]
        return torch.cat([p.to(torch.int64) for p in parts])

    @classmethod
    def unpack(cls, flat: torch.Tensor) -> ForwardBatch:
        t, b, w, n_logits, decode_only = (int(x) for x in flat[:5].tolist())
        sizes = [t, t, t, b * w, b, b, b, n_logits]
        chunks = flat[5:].split(sizes)
        return cls(
            input_ids=chunks[0], positions=chunks[1], slot_mapping=chunks[2],
            page_table=chunks[3].view(b, w), prefix_lens=chunks[4], extend_lens=chunks[5],
            seq_lens=chunks[6], logit_rows=chunks[7], decode_only=bool(decode_only),
        )
