"""The frozen model zoo: the registry of manifests (`manifests/`), finding and safely reading
weights, the frozen-model base, the vision teachers and the image tokenizers with their loaders,
and the FID Inception network. Adding a model of a known family is one manifest; a new family is
one loader module here."""
