"""Data parts: sources (RecordIO, image folders, ``.bin`` pairs, IJB, synthetic identities, glyphs), decoding,
alignment, transforms, masks, AdaFace's augmentations (``augment``) and samplers. The public contract of a
training data source is
:mod:`faceforge.data.source` (``TrainingSet``, ``DecodedImages``, ``TrainImages``, ``open_source``)."""

from faceforge.data.source import (
    BadRecordError, DataSource, DecodedImages, SourceError, TrainImages, TrainingSet, open_source,
)

__all__ = ["BadRecordError", "DataSource", "DecodedImages", "SourceError", "TrainImages", "TrainingSet", "open_source"]
