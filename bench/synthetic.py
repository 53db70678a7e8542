"""Torch-free synthetic inputs for tests and benchmarks: scenes of a bright square, a labeling config, Label Studio
webhook payloads."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def square_scene(seed: int, size: tuple[int, int] = (48, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A noisy RGB image (H, W, 3 uint8) with a bright square and that square's mask (H, W bool)."""
    rng = np.random.default_rng(seed)
    h, w = size
    image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=bool)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask[y : y + h // 3, x : x + w // 3] = True
    image[mask] = rng.integers(180, 255, 3, dtype=np.uint8)
    return image, mask



CONFIG_XML = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="square"/><Label value="other"/></BrushLabels>
</View>"""


def png_data_uri(array: np.ndarray) -> str:
    """An image as a data: URI (task data that needs no server)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def annotation_event(annotation_id: int, task_id: int, image: np.ndarray, mask: np.ndarray, *, project: int = 1,
                     label: str = "square", action: str = "ANNOTATION_CREATED", cancelled: bool = False) -> dict:
    """A Label Studio annotation webhook payload with one brush region."""
    from backend.core.rle import mask_to_rle

    h, w = mask.shape
    region = {"id": "r1", "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": w,
              "original_height": h, "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}
    return {
        "action": action,
        "annotation": {"id": annotation_id, "task": task_id, "result": [region], "was_cancelled": cancelled,
                       "ground_truth": False},
        "task": {"id": task_id, "data": {"image": png_data_uri(image)}, "project": project},
        "project": {"id": project, "label_config": CONFIG_XML},
    }
