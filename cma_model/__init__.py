"""cma_model: the Cross-Modal Adapter on open_clip models, data, losses and metrics."""
from .adapter import (BACKENDS, CrossModalAdapter, CrossModalAdapterConfig, SharedUpProjection, adapter_modules,
                      adapter_named_parameters, adapter_state_dict, add_cross_modal_adapters,
                      count_trainable_parameters, load_adapter_state_dict, pair_blocks,
                      remove_cross_modal_adapters, set_adapter_backend, set_recompute)
from .datasets import AnnotationError, Annotations, load_annotations
from .losses import infonce, similarity
from .metrics import multi_caption_metrics, retrieval_metrics
from .video import VideoError, sample_frames

__all__ = ["BACKENDS", "CrossModalAdapter", "CrossModalAdapterConfig", "SharedUpProjection", "adapter_modules",
           "adapter_named_parameters", "adapter_state_dict", "add_cross_modal_adapters", "count_trainable_parameters",
           "load_adapter_state_dict", "pair_blocks", "remove_cross_modal_adapters", "set_adapter_backend",
           "set_recompute",
           "AnnotationError", "Annotations",
           "load_annotations", "infonce", "similarity", "multi_caption_metrics", "retrieval_metrics", "VideoError",
           "sample_frames"]
