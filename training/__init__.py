"""The SOLAR training stages: continued pretraining, SFT, DPO/sDPO, built on solar_kernels."""
