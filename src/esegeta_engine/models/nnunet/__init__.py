"""nnU-Net v2 results folders, explained as ``nnUNetv2_predict`` runs them.

:mod:`.folder` reads and checks the folder (plans, dataset, fold checkpoints with
``weights_only=True``) and builds each fold's network with nnU-Net's own trainer class;
:mod:`.resample` turns nnU-Net's resampling functions into exact per-axis matrices;
:mod:`.window` is nnU-Net's Gaussian sliding window with mirroring and the fold ensemble
(patch-wise recomputation in the backward); :mod:`.pipeline` is the whole deployed
function as one module; :mod:`.source` registers the loader. nnunetv2 is an optional
dependency (``napari-esegeta[nnunet]``), imported only when such a folder is loaded.
"""
