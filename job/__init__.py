"""finetune-job: folder-per-class images in S3 -> two-phase transfer learning -> SavedModel in S3."""

__version__ = "0.2.0"
