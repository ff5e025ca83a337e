"""Gemma 2 (attention-logit soft-capping) through the ``torch`` and ``triton`` backends' whole engine, against
transformers (the ``cpu`` backend's run is in tests/models/test_families.py). On CPU the Triton kernels run
under the interpreter (this folder's conftest sets ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import pytest
from transformers import Gemma2ForCausalLM

from tests.models.compare import compare
from tests.models.hf_tiny import save_tiny
from tests.models.test_families import VOCAB, gemma2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gemma2_softcap_on_backend_matches_transformers(tmp_path, backend) -> None:
    model_cls, config = gemma2()
    assert model_cls is Gemma2ForCausalLM and config.attn_logit_softcapping
    folder, model = save_tiny(tmp_path / "g2", model_cls, config)
    worst = compare(folder, model, VOCAB, backend=backend)
    print(f"gemma2 on {backend}: max relative logit difference {worst:.2e}")
