"""What brainsam's infer tasks share: they answer in the structures of one label set."""

from typing import Any, Dict

from monailabel.interfaces.tasks.infer_v2 import InferTask

from brainsam.core.labels import LabelSet


class LabelSetInfer(InferTask):
    """An infer task whose labels are `label_set`'s structures (set by the subclass)."""

    label_set: LabelSet

    def info(self) -> Dict[str, Any]:
        """MONAI Label's model info plus each structure's display colour (RGB 0-255)."""
        info = super().info()
        info["label_colors"] = {structure.name: list(structure.color) for structure in self.label_set.structures}
        return info

    def is_valid(self) -> bool:
        return True
