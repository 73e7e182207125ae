"""The non-neural peers behind `launch/peers.py`: features from the schema's columns, LightGBM and
logistic-regression fits scored with the pipeline's exact metrics."""
