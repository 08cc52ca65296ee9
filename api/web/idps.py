"""Where each IdP takes the Tenant URL and Token (Sally's help page, section 3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Idp:
    key: str
    label: str
    steps: tuple[str, ...]
    note: str = ""


FINAL = "After provisioning has started, come back here and map the groups and licenses (Mapping)."

IDPS: dict[str, Idp] = {
    idp.key: idp
    for idp in (
        Idp("entra", "Microsoft Entra (Azure AD)", (
            'In the Azure portal, go to "Enterprise Applications" and click "+ New application".',
            'Select "Create your own application".',
            'Name it (e.g. "Sally AI SCIM Integration"), choose "Integrate any other application you don\'t find '
            'in the gallery (Non-gallery)" and click Create.',
            "Open the application and go to Provisioning.",
            'Click "+ New configuration".',
            'Enter the Tenant URL and Secret Token from this page, click "Test connection", then Create.',
            "Assign groups to the application (only groups are provisioned to Sally, not single users).",
            'Click "Start provisioning".',
            FINAL,
        ), note="Entra provisions about every 40 minutes; the first cycle pushes everything."),
        Idp("google", "Google Workspace", (
            "Open Admin Console → Apps → Web and mobile apps.",
            "Add a new custom SCIM app.",
            "Enter the Tenant URL and Token.",
            "Assign groups for provisioning.",
            FINAL,
        )),
        Idp("okta", "Okta", (
            "Go to Applications → select your Sally app.",
            "Open the Provisioning tab.",
            "Enter the Tenant URL and Token.",
            "Enable the provisioning features (create, update, deactivate users).",
            FINAL,
        )),
        Idp("onelogin", "OneLogin", (
            "Navigate to Apps → SCIM Provisioning.",
            "Paste the Tenant URL and Token.",
            "Map groups and save.",
            FINAL,
        )),
        Idp("pingone", "PingOne", (
            "Go to Connections → Provisioning.",
            "Add a new SCIM connection.",
            "Provide the Tenant URL and Token.",
            "Test and activate.",
            FINAL,
        )),
    )
}
