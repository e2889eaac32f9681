"""nnU-Net predictor subclass and the nnUNetv2_predict_ood entry point."""
