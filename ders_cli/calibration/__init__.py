"""What the model computes, measured on text: reading text with the model's tokenizer
(``text``), running a model one decoder layer at a time and recording what each MoE layer's
experts see (``sequential``), and choosing an archive's codes by the outputs they give
(``solve``). ``ders eval`` and calibrated compression (``--calibration``) are built on these."""
