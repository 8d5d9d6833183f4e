"""A toy world where AnyV2V's claims can be measured offline: seeded videos of moving shapes
(`world`), a tiny I2VGen-XL trained on them (`train`, weights shipped in `weights/`), and a demo
edit on that model (`demo`)."""
