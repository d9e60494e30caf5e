"""The miniature: LongAlign's whole pipeline at a size that trains on a CPU, on a synthetic world whose
captions can be checked in the pixels (see mini/README.md). Its scripts run as modules:

    python -m mini.pretrain --stage clip|vae ...   the miniature's own scorer / text encoder and VAE
    python -m mini.evaluate --row NAME=PIPELINE ...  fact accuracy, Fréchet distance, Table 1 in miniature
    python -m mini.diagnose                          where the shipped miniature loses the caption
    bash mini/recipe.sh                              every stage, from nothing to weights/mini
"""
