//! A compiled script's commands and tests.

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cmd {
    If {
        branches: Vec<(Test, Vec<Cmd>)>,
        otherwise: Option<Vec<Cmd>>,
    },
    Stop,
    Keep {
        flags: Option<Vec<String>>,
    },
    Discard,
    FileInto {
        folder: String,
        copy: bool,
        create: bool,
        flags: Option<Vec<String>>,
    },
    Redirect {
        address: String,
        copy: bool,
    },
    SetFlag(Vec<String>),
    AddFlag(Vec<String>),
    RemoveFlag(Vec<String>),
    Vacation(VacationSpec),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VacationSpec {
    pub days: u64,
    pub subject: Option<String>,
    pub from: Option<String>,
    pub addresses: Vec<String>,
    pub mime: bool,
    pub handle: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    All,
    Local,
    Domain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rel {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Is,
    Contains,
    Matches,
    Value(Rel),
    Count(Rel),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmp {
    Casemap,
    Octet,
    Numeric,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Match {
    pub kind: Kind,
    pub cmp: Cmp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyPart {
    Raw,
    Text,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Test {
    Address {
        part: Part,
        m: Match,
        headers: Vec<String>,
        keys: Vec<String>,
    },
    Envelope {
        part: Part,
        m: Match,
        which: Vec<String>,
        keys: Vec<String>,
    },
    Header {
        m: Match,
        headers: Vec<String>,
        keys: Vec<String>,
    },
    Exists(Vec<String>),
    Size {
        over: bool,
        limit: u64,
    },
    AllOf(Vec<Test>),
    AnyOf(Vec<Test>),
    Not(Box<Test>),
    True,
    False,
    Body {
        part: BodyPart,
        m: Match,
        keys: Vec<String>,
    },
    HasFlag {
        m: Match,
        keys: Vec<String>,
    },
}
