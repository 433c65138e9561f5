"""`dreamloom lora merge|resize|extract|info`: the tools people maintain their adapter files with."""
