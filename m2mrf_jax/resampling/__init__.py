"""Feature-resampling operators for HRNetV2, NHWC: M2MRF and the operators the paper compares it with.

Down (halve the resolution): stride conv (`layers.Conv2d`), `pooling.MaxPool`, `lip.LIP`,
`carafe.CARAFEDown` (CARAFE++), `indexnet.IndexPool`, `a2u.A2UDown`, `m2mrf.M2MRF`.
Up: bilinear (`layers.Upsample`), `pooling.MaxUnpool`, `deconv.Deconv`, `carafe.CARAFE`,
`indexnet.IndexUnpool`, `a2u.A2UUp`, `m2mrf.M2MRF`. How they are wired into HRNetV2 is `hrnet.Resampling`.
"""
