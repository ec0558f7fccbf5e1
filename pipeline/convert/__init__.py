"""Importers of foreign weights into native checkpoints (see docs/weights.md).

* :mod:`pipeline.convert.caffe`: the authors' released ``.caffemodel`` files;
* :mod:`pipeline.convert.torchvision`: torchvision's ImageNet VGG-16, as an initialisation;
* :mod:`pipeline.convert.protobuf`: the protobuf wire-format reader the Caffe importer uses.
"""
