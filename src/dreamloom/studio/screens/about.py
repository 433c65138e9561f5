"""About: what this studio runs on (`dreamloom doctor`): library versions against the tested lock,
the GPU, bitsandbytes, free disk, and any known bad combination with its fix."""

import pandas as pd
import streamlit as st

from dreamloom.doctor import report
from dreamloom.studio import literal

st.title("About this installation")
st.caption("The same report as `dreamloom doctor`. 'locked' means the version the test suite passed with.")
checks = report()
problems = [c for c in checks if c.level == "problem"]
for check in problems:
    st.error(literal(f"{check.name}: {check.value}. Fix: {check.fix}"), icon=":material/error:")
if not problems:
    st.success("No known problems.", icon=":material/check_circle:")
st.dataframe(pd.DataFrame([{"": {"ok": "✓", "note": "•", "problem": "✗"}[c.level], "what": c.name, "value": c.value,
                            "fix": c.fix} for c in checks]), hide_index=True, width="stretch")
