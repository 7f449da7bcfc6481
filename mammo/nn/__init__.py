"""The networks and their losses: ``models`` (the ACA-ASPP ResUNet and the baselines, ``build_model``) and ``losses``
(Dice + cross-entropy / BCE, partial labels). The root ``models.py`` and ``losses.py`` re-export them."""
