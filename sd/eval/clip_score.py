"""CLIP score between images and their prompts, with ppdiffusers' CLIPModel from a local folder.

Two conventions are in use, and both are reported:
- `clip_score`: torchmetrics' CLIPScore, max(100 * cos(E_image, E_text), 0) averaged over the pairs (0..100);
- `clip_cosine`: the plain cosine averaged over the pairs, what MLPerf Training's SDv2 benchmark compares with its
  0.15 bar (its reference evaluation averages `image_features @ text_features.T` of normalised OpenCLIP ViT-H-14
  embeddings, without the x100 and without the clamp at 0).
The numbers depend on the CLIP model: MLPerf uses OpenCLIP ViT-H-14 (laion2b_s32b_b79k), torchmetrics defaults to
openai/clip-vit-large-patch14. Both exist as Hugging Face folders (config.json, model.safetensors, vocab.json,
merges.txt, preprocessor_config.json), which is what --clip_model takes; nothing is downloaded.

Images are prepared by the folder's CLIPImageProcessor (preprocessor_config.json: resize the short side, centre
crop, normalise), or CLIP's defaults at the model's image size when the folder has none; prompts are tokenised
and cut at the text model's length (77 for CLIP).
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np
import paddle

PREPROCESSOR_CONFIG = "preprocessor_config.json"


def load_clip_model(folder: str):
    """ppdiffusers' CLIPModel from the folder's config.json and safetensors, read here rather than by
    from_pretrained: its torch conversion writes a pickled model_state.pdparams into the user's folder, and its
    safetensors reader fails on 0-d tensors (logit_scale). Torch/Hugging Face exports (metadata format "pt") get
    ppdiffusers' own name and layout conversion."""
    from ppdiffusers.models.modeling_pytorch_paddle_utils import convert_pytorch_state_dict_to_paddle
    from ppdiffusers.transformers import CLIPConfig, CLIPModel
    from safetensors import safe_open

    model = CLIPModel(CLIPConfig.from_pretrained(folder))
    state, torch_layout = {}, False
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")):
        with safe_open(os.path.join(folder, name), framework="np") as f:
            torch_layout |= (f.metadata() or {}).get("format") == "pt"
            state.update({k: f.get_tensor(k) for k in f.keys()})
    if torch_layout:
        state = convert_pytorch_state_dict_to_paddle(model, state)
    want = model.state_dict()
    missing = sorted(k for k in want if k not in state)
    wrong = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or wrong:
        raise ValueError(f"--clip_model {folder}: weights do not fit its config.json (missing {missing[:3]}, "
                         f"wrong shapes {wrong[:3]})")
    model.set_state_dict({k: paddle.to_tensor(state[k]).astype(want[k].dtype) for k in want})
    model.eval()
    return model


def check_clip_folder(folder: str) -> None:
    """Refused before anything loads: not a folder, no config.json or tokenizer files, no safetensors weights,
    or pickled weights (loading a pickle can run code)."""
    from trainer.checkpoint import refuse_pickled_weights

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--clip_model: no such folder: {folder} (a local CLIP model folder, e.g. "
                                "openai/clip-vit-large-patch14 as downloaded from Hugging Face)")
    names = set(os.listdir(folder))
    missing = [n for n in ("config.json", "vocab.json", "merges.txt") if n not in names]
    if missing:
        raise FileNotFoundError(f"--clip_model {folder}: no {', '.join(missing)} (a CLIP model folder holds "
                                "config.json, model.safetensors and its tokenizer files)")
    refuse_pickled_weights(folder, "--clip_model", False)
    if not any(n.endswith(".safetensors") for n in names):
        raise FileNotFoundError(f"--clip_model {folder}: no .safetensors weights")


class ClipScorer:
    """A CLIPModel with its tokenizer and image processor, in eval mode."""

    def __init__(self, folder: str):
        from ppdiffusers.transformers import CLIPImageProcessor, CLIPTokenizer

        check_clip_folder(folder)
        self.folder = folder
        self.model = load_clip_model(folder)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        if os.path.isfile(os.path.join(folder, PREPROCESSOR_CONFIG)):
            self.processor = CLIPImageProcessor.from_pretrained(folder)
        else:  # CLIP's defaults (bicubic, short side, centre crop, CLIP mean/std) at the model's own size
            size = int(self.model.config.vision_config.image_size)
            self.processor = CLIPImageProcessor(size={"shortest_edge": size},
                                                crop_size={"height": size, "width": size})

    @paddle.no_grad()
    def cosines(self, images: Sequence[np.ndarray], prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """cos(E_image, E_text) of each (uint8 HWC image, prompt) pair."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out: List[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            ims, texts = list(images[start:start + batch_size]), list(prompts[start:start + batch_size])
            pixels = self.processor(images=ims, return_tensors="pd")["pixel_values"]
            tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                    return_tensors="pd")
            image_emb = self.model.get_image_features(pixel_values=pixels.astype("float32"))
            text_emb = self.model.get_text_features(input_ids=tokens["input_ids"])
            out.append(cosine_rows(image_emb.numpy(), text_emb.numpy()))
        return np.concatenate(out) if out else np.zeros(0)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [n, d] arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def clip_sums(cosines: np.ndarray) -> Tuple[float, float, int]:
    """(sum of max(100 cos, 0), sum of cos, count): what ranks add up before dividing."""
    c = np.asarray(cosines, np.float64)
    return float(np.maximum(100.0 * c, 0.0).sum()), float(c.sum()), int(c.size)


def clip_means(score_sum: float, cosine_sum: float, count: int) -> dict:
    """{"clip_score": torchmetrics' convention (0..100), "clip_cosine": MLPerf's (the 0.15 bar)}."""
    if count == 0:
        raise ValueError("no image-prompt pairs to score")
    return {"clip_score": score_sum / count, "clip_cosine": cosine_sum / count}
