//! The roles every installation starts with, and the permissions each grants (API.md).

/// Every permission an endpoint can demand.
pub const ALL_PERMISSIONS: &[&str] = &[
    "profile:write",
    "rooms:write",
    "messages:write",
    "files:write",
    "files:read",
    "audit:read",
    "projections:manage",
    "jobs:manage",
    "analytics:read",
    "users:read",
    "users:write",
    "roles:manage",
];

/// The role a newly registered user holds.
pub const DEFAULT_ROLE: &str = "user";

/// The seeded roles and their permissions. `admin` holds every permission.
#[must_use]
pub fn seeded_roles() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("admin", ALL_PERMISSIONS.to_vec()),
        ("user", vec!["profile:write", "rooms:write", "messages:write", "files:write", "files:read"]),
        ("readonly", vec!["files:read"]),
        ("auditor", vec!["audit:read"]),
        ("operator", vec!["projections:manage", "jobs:manage", "analytics:read"]),
    ]
}

/// The permissions of a role, or `None` when no such role exists.
#[must_use]
pub fn permissions_of(role: &str) -> Option<Vec<&'static str>> {
    seeded_roles().into_iter().find(|(name, _)| *name == role).map(|(_, perms)| perms)
}

/// The union of the permissions of `roles`, sorted and without duplicates. Unknown roles add nothing.
#[must_use]
pub fn permissions_for<'a>(roles: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut perms: Vec<String> = roles.into_iter().filter_map(permissions_of).flatten().map(str::to_owned).collect();
    perms.sort();
    perms.dedup();
    perms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_holds_every_permission() {
        assert_eq!(permissions_for(["admin"]).len(), ALL_PERMISSIONS.len());
    }

    #[test]
    fn permissions_are_a_union_without_duplicates() {
        let perms = permissions_for(["user", "readonly", "nonexistent"]);
        assert_eq!(perms.iter().filter(|p| *p == "files:read").count(), 1);
        assert!(perms.contains(&"profile:write".to_owned()));
        assert!(!perms.contains(&"users:read".to_owned()));
    }
}
