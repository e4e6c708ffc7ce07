"""The official repository's config modules (google-research/vision_transformer's
vit_jax/configs/), as thin aliases of this codebase's recipes in configs/ and its registry."""
