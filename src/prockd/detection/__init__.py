"""Object detection: cross-task and same-task detection KD on Faster R-CNN + FPN (torchvision).

The detection side reuses the core (config loading and overrides, registry, PL / FA modules, atomic
checkpoints, optimiser and schedules, paired-seed statistics) and adds what is task-specific:

- :mod:`~prockd.detection.config`: the detection experiment config (``task: detection``);
- :mod:`~prockd.detection.data`: COCO-json and VOC-XML datasets read from disk through a ``DataLoader``,
  validated up front (malformed annotations name the file and the entry), and the embedded canvases;
- :mod:`~prockd.detection.models`: detectors by backbone name, the frozen teacher's pyramid on the
  student's own preprocessed batch;
- :mod:`~prockd.detection.methods`: the distillers on FPN levels (ProC-KD and the baselines);
- :mod:`~prockd.detection.evaluate`: COCO metrics (faster-coco-eval), per-class AP50;
- :mod:`~prockd.detection.engine`: the training loop (checkpoints, resume, DDP, AMP).
"""
